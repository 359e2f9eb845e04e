"""`mlx-coconut serve`: one request's latency vs in-process generation, and 4 clients vs 1.

    python scripts/bench_serve.py --model runs/stage1 --max-tokens 32

Latency: the same question through `api.generate_answers` (what `generate` runs once its model is
loaded) and through POST /v1/completions on a server in this process (same loaded model), alternated.
Throughput: `--requests` questions sent by 1 client one after another, then by 4 concurrent clients.
All traffic is on 127.0.0.1.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run or model directory")
    p.add_argument("--data", default=None, help="questions (JSON records) [synthetic]")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=16, help="questions per throughput round")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cli", action="store_true", help="also time one `mlx-coconut generate` process")
    args = p.parse_args(argv)

    from mlx_coconut import api
    from mlx_coconut.data import load_records, synth_records
    from mlx_coconut.serve import close_server, make_server

    records = load_records(args.data) if args.data else synth_records(args.requests, seed=7)
    questions = [r.question for r in records][:args.requests]
    loaded = api.load(args.model)
    server = make_server(loaded, "127.0.0.1", 0, max_batch=8, quiet=True)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = {"prompt": questions[0], "max_tokens": args.max_tokens}
    api.generate_answers(loaded, [questions[0]], args.max_tokens, batch_size=1)  # warm up both paths
    post(port, body)

    lib, http_ = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        [a] = api.generate_answers(loaded, [questions[0]], args.max_tokens, batch_size=1, return_thoughts=True)
        lib.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = post(port, body)
        http_.append(time.perf_counter() - t)
        assert out["choices"][0]["text"] == a.text
    print(f"one request ({len(a.tokens)} tokens, {out['coconut']['num_thoughts']} thoughts): "
          f"generate_answers {statistics.median(lib) * 1e3:.0f} ms | HTTP {statistics.median(http_) * 1e3:.0f} ms "
          f"(medians of {args.repeats})")

    if args.cli:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlx_coconut.cli", "generate", "--model", args.model, "--prompt",
                        questions[0], "--max-tokens", str(args.max_tokens), "--json"], check=True,
                       capture_output=True)
        print(f"`mlx-coconut generate` process (start + load + generate): {time.perf_counter() - t:.2f} s")

    for clients in (1, args.clients):
        sizes = len(server.engine.batch_sizes)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outs = list(pool.map(lambda q: post(port, {"prompt": q, "max_tokens": args.max_tokens}), questions))
        wall = time.perf_counter() - t
        tokens = sum(o["usage"]["completion_tokens"] for o in outs)
        batches = server.engine.batch_sizes[sizes:]
        print(f"{clients} client(s): {len(questions)} requests in {wall:.2f} s = {len(questions) / wall:.2f} req/s, "
              f"{tokens / wall:.1f} generated tok/s; batches run: {len(batches)} "
              f"(mean {statistics.mean(batches):.1f} prompts)")
    close_server(server)


if __name__ == "__main__":
    main()
