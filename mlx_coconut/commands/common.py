"""What every command shares: one-line errors (exit 2), Ctrl-C / SIGTERM (exit 130), a bug's
traceback with a request to report it; and the process start, for `train`'s first-step clock."""

import functools
import signal
import sys
import threading
import time
import traceback

import click

from ..errors import describe

_STARTED = [time.perf_counter()]  # ~ the process start (mlx is imported later)


def process_start():
    """The process start, for the first `train` of the process to time its set-up from (imports
    included); None afterwards, so that later in-process runs (the quickstart's) count from their own
    start."""
    return _STARTED.pop() if _STARTED else None


def friendly_errors(fn):
    """Expected failures: one line, exit 2. Ctrl-C: one line, exit 130. Anything else: traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: temp files and dirs are cleaned up
        term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if term == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            line = describe(e)
            if line is None:
                traceback.print_exc()
                click.echo(f"error: this is a bug in mlx-coconut ({type(e).__name__}); please report "
                           f"it with the command line and the traceback above", err=True)
                sys.exit(1)
            click.echo(f"error: {line}", err=True)
            sys.exit(2)
        finally:
            if term == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, term)

    return wrapper


def _interrupt(*_):
    raise KeyboardInterrupt
