"""Load the daemon with N concurrent streaming clients; compare one client's tokens/s with the in-process API.

  python scripts/bench_serve.py [--model DIR] [--clients 8] [--requests 5] [--max-tokens 64]

Starts `edge-runtime serve` on a free 127.0.0.1 port (or uses --url), then:
 1. overhead: the same prompt, greedy, one client at a time through the daemon and in-process;
    prints daemon tokens/s as a fraction of in-process tokens/s (same process count, same model);
 2. load: N clients x M streamed requests; time to first token, per-request tokens/s, p50/p99
    latency, and how many were refused (429) or failed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

try:
    import httpx
except ImportError:
    raise SystemExit("bench_serve.py: error: needs httpx and the serve extra: pip install httpx '.[serve]'") from None

import edge_runtime
from edge_runtime.bench import print_report
from edge_runtime.cli_args import description
from edge_runtime.paths import resolve_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_once(url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, pieces, status = None, 0, 0
    with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        if status == 200:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces += 1
        else:
            r.read()
    total = time.perf_counter() - t0
    return {"status": status, "ttft_s": ttft, "latency_s": total}


def generated_tokens(url: str) -> float:
    """The daemon's own count, from its Prometheus endpoint."""
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("edge_runtime_generated_tokens_total"))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def in_process_rate(model, prompt: str, max_tokens: int) -> float:
    """Median tokens/s of Runtime.generate (whole call, as a client sees it) over 5 warmed-up runs."""
    rt = edge_runtime.load(model, backend="cpu")  # the same profile policy the daemon applies
    rt.generate(prompt, max_new_tokens=8)
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        n = len(rt.generate(prompt, max_new_tokens=max_tokens).token_ids)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def wait_for_daemon(proc: subprocess.Popen, url: str, limit_s: float) -> None:
    """Until /health answers. The first start after an install compiles the cpu kernels (about 40 s on 2 cores,
    more on a board), so the limit is minutes; a daemon that exits or never answers ends the run with a message."""
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve.py: error: the daemon exited with status {proc.returncode} before it "
                             "answered (its message is above)")
        try:
            httpx.get(url + "/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"bench_serve.py: error: the daemon did not answer {url}/health within {limit_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default=None)
    ap.add_argument("--url", default=None, help="an already running daemon")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The old man looked at the sea and")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = resolve_model(args.model)
    if args.in_process:
        print(json.dumps({"tokens_per_s": in_process_rate(model, args.prompt, args.max_tokens)}))
        return
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--backend", "cpu", "--max-queue", str(args.clients * args.requests)])
        wait_for_daemon(proc, url, limit_s=300)
    try:
        # 1. overhead against the in-process API: same greedy request, warmed up, 5 runs each, medians.
        # The in-process figure comes from a child process of its own, and this client loads no model:
        # on a 2-core machine a process's idle BLAS threads spin on the cores another process needs.
        body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
        child = subprocess.run([sys.executable, __file__, "--in-process", "--model", str(model), "--prompt",
                                args.prompt, "--max-tokens", str(args.max_tokens)], capture_output=True, text=True,
                               check=True)
        inproc = json.loads(child.stdout)["tokens_per_s"]
        daemon = []
        # one client for all timed requests: httpx.post builds a client (and an SSL context) per call,
        # tens of milliseconds that belong to the client, not to the daemon
        with httpx.Client(timeout=120) as h:
            h.post(url + "/v1/completions", json={**body, "max_tokens": 8})
            for _ in range(5):
                t0 = time.perf_counter()
                r = h.post(url + "/v1/completions", json=body).json()
                daemon.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        # 2. concurrent streamed load
        results: list[dict] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            for j in range(args.requests):
                res = stream_once(url, {**body, "temperature": 0.8, "seed": 1000 * i + j, "stream": True})
                with lock:
                    results.append(res)

        generated_before = generated_tokens(url)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        generated = generated_tokens(url) - generated_before
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    ok = [r for r in results if r["status"] == 200]
    report = {
        "tokens_per_s_in_process": inproc, "tokens_per_s_daemon": statistics.median(daemon),
        "daemon_over_in_process": statistics.median(daemon) / inproc,
        "clients": args.clients, "requests": len(results), "ok": len(ok),
        "refused_429": sum(r["status"] == 429 for r in results),
        "errors": sum(r["status"] not in (200, 429) for r in results),
        "ttft_p50_s": pct([r["ttft_s"] for r in ok if r["ttft_s"]], 0.5),
        "ttft_p99_s": pct([r["ttft_s"] for r in ok if r["ttft_s"]], 0.99),
        "latency_p50_s": pct([r["latency_s"] for r in ok], 0.5),
        "latency_p99_s": pct([r["latency_s"] for r in ok], 0.99),
        "aggregate_tokens_per_s": generated / wall,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, 26)


if __name__ == "__main__":
    main()
