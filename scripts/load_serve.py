"""`mlx-coconut serve` under load (issue 25): idle latency, 32 concurrent streamed requests, and one
request right after 20 streams dropped after their first event.

    python scripts/load_serve.py --model runs/stage1 --max-tokens 32

The server runs in this process on 127.0.0.1 (port 0); every client has a timeout, every loop a bound.
"""

import argparse
import http.client
import json
import socket
import statistics
import threading
import time

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does Tom have?"


def post(port, body, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def drop_stream(port, max_tokens):
    body = json.dumps({"prompt": QUESTION, "max_tokens": max_tokens, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        seen = b""
        while b"data: " not in seen and (chunk := s.recv(4096)):
            seen += chunk


def main(argv=None):
    from mlx_coconut import api
    from mlx_coconut.serve import close_server, make_server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--dropped", type=int, default=20)
    args = p.parse_args(argv)

    srv = make_server(api.load(args.model), "127.0.0.1", 0, quiet=True)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    one = {"prompt": QUESTION, "max_tokens": args.max_tokens}
    try:
        post(port, one)  # warm-up
        idle = statistics.median(timed(lambda: post(port, one))[0] for _ in range(3))
        print(f"idle: one request {idle:.2f} s (median of 3)")

        results = [None] * args.streams

        def client(i):
            results[i] = timed(lambda: post(port, {**one, "stream": True}))

        steps = srv.engine.steps
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.streams)]
        wall, _ = timed(lambda: [t.start() for t in threads] + [t.join(900) for t in threads])
        ok = sum(r is not None and r[1][0] == 200 and r[1][1].endswith("data: [DONE]\n\n") for r in results)
        tokens = sum(1 for r in results if r for line in r[1][1].split("\n\n")
                     if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"))
        lat = sorted(r[0] for r in results if r)
        print(f"{args.streams} concurrent streams: {ok}/{args.streams} complete in {wall:.1f} s, "
              f"{args.streams / wall:.2f} req/s, {tokens / wall:.1f} streamed chunks/s, latency p50 "
              f"{lat[len(lat) // 2]:.1f} s max {lat[-1]:.1f} s, {srv.engine.steps - steps} decode steps")

        srv.engine.idle.wait(600)
        for _ in range(args.dropped):
            drop_stream(port, max_tokens=max(args.max_tokens, 200))
        after, _ = timed(lambda: post(port, one))
        print(f"after {args.dropped} dropped streams: one request {after:.2f} s ({after / idle:.1f}x idle)")
    finally:
        close_server(srv)


if __name__ == "__main__":
    main()
