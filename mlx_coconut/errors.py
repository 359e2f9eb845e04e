"""One exception type for user-facing errors: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a file, a line, a flag). Message must name what is wrong and where."""
