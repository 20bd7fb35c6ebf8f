"""Load on ``maskdiff serve``: 1, 4, 16 and 64 concurrent clients, batched serving against one
request at a time, in one run.

The benchmark starts two ``maskdiff serve RUN`` processes on free ports of 127.0.0.1 (nothing else
is contacted): ``batched`` (``--max-active 64``: concurrent requests share network calls) and
``serial`` (``--max-active 1``: one request sampled at a time, the others queued). After a warm-up
request each, for each number of clients C it sends ``max(--requests, C)`` requests to each server (C
clients, each sending its share one after the other; a round stops issuing requests after
``--max-seconds``), ``--rounds`` times with the two modes alternating, and reports per mode:

* requests/s and generated tokens/s (positions sampled over the round's wall time; median over
  the rounds);
* p50 and p99 latency of a request (send to full response; over every request of the level);
* errors (any status other than 200, or a failed connection: must be 0);
* requests per network call (``/v1/stats``: how many requests shared a network call);
* the server's CPU time per request (user + system from /proc: on a busy machine a steadier measure
  of what batching saves than wall time);
* each server's resident memory (VmRSS) after the warm-up and after the last level;

and the ratios batched / serial of requests/s and serial / batched of CPU time per request. Every request: ``--steps`` steps, one
unconditional sample of ``--length`` tokens (default the model's; every position generated), its
own seed.

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_serve.py --run runs/demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: str, max_active: int, queue: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "maskdiff.cli", "serve", run, "--port", str(port), "--host", "127.0.0.1",
           "--max-active", str(max_active), "--queue-size", str(queue), "--threads", str(threads),
           "--timeout", "600", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"maskdiff serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("maskdiff serve did not start within 120 s")


async def run_level(url: str, pid: int, clients: int, requests: int, body: dict, max_seconds: float) -> dict:
    """``requests`` requests from ``clients`` concurrent clients to the server ``pid`` at ``url``:
    latencies, errors, wall time and the server's CPU time."""
    latencies: list[float] = []
    errors = 0
    tokens = 0
    counter = iter(range(requests))
    stop_at = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        before = (await http.get("/v1/stats")).json()

        async def client() -> None:
            nonlocal errors, tokens
            for k in counter:
                if time.monotonic() > stop_at:
                    return
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/generate", json={**body, "seed": k})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start)
                if not ok:
                    errors += 1
                    continue
                out = r.json()
                tokens += sum(len(s["tokens"]) for s in out["samples"])

        wall, cpu = time.perf_counter(), cpu_s(pid)
        await asyncio.gather(*(client() for _ in range(clients)))
        wall, cpu = time.perf_counter() - wall, cpu_s(pid) - cpu
        after = (await http.get("/v1/stats")).json()
    calls = after["network_calls"] - before["network_calls"]
    asked = after["network_requests"] - before["network_requests"]
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": wall, "latencies": lat,
            "requests_per_s": len(lat) / wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "requests_per_network_call": asked / max(calls, 1), "server_cpu_ms_per_request": 1000 * cpu / len(lat)}


def median_level(runs: list[dict]) -> dict:
    """One level's rounds together: median requests/s and tokens/s over the rounds, latency
    percentiles over every request, errors and requests summed."""
    lat = sorted(x for r in runs for x in r["latencies"])
    return {"clients": runs[0]["clients"], "rounds": len(runs), "requests": len(lat),
            "errors": sum(r["errors"] for r in runs),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "requests_per_network_call": statistics.median(r["requests_per_network_call"] for r in runs),
            "server_cpu_ms_per_request": statistics.median(r["server_cpu_ms_per_request"] for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/shared-compare/md4", help="run folder to serve (read-only)")
    p.add_argument("--clients", default="1,4,16,64", help="numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=32, help="requests per level and round (all clients together)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level; the modes alternate within a level")
    p.add_argument("--steps", type=int, default=32, help="sampling steps per request")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's length)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="a level's round issues no request after this")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    body = {"steps": args.steps, "num_samples": 1, **({"length": args.length} if args.length else {})}

    modes = {"batched": max(clients), "serial": 1}  # max_active of each server
    servers = {mode: start_server(args.run, active, max(clients), args.threads) for mode, active in modes.items()}
    try:
        info = httpx.get(servers["batched"][1] + "/v1/model").json()
        rss_before = {}
        for mode, (proc, url) in servers.items():
            httpx.post(url + "/v1/generate", json={**body, "seed": 0}, timeout=600).raise_for_status()  # warm-up
            rss_before[mode] = rss_mib(proc.pid)
        print(f"run {args.run}: {info['method']}, model length {info['length']}, {info['vocabulary']['kind']} "
              f"vocabulary; requests of {args.length or info['length']} tokens, {args.steps} steps; "
              f"{args.requests} requests per level and round, {args.rounds} rounds; server threads {args.threads}",
              flush=True)
        levels: dict[str, list[dict]] = {mode: [] for mode in modes}
        for c in clients:
            rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
            for k in range(args.rounds):
                order = list(modes) if k % 2 == 0 else list(reversed(modes))  # alternate: drifts cancel
                for mode in order:
                    proc, url = servers[mode]
                    rounds[mode].append(asyncio.run(run_level(url, proc.pid, c, max(args.requests, c), body,
                                                              args.max_seconds)))
            for mode in modes:
                levels[mode].append(median_level(rounds[mode]))
        rss_after = {mode: rss_mib(proc.pid) for mode, (proc, _) in servers.items()}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    print("\n| mode | clients | requests | req/s | tokens/s | p50 s | p99 s | errors | requests per network call "
          "| server CPU ms per request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for lv in levels[mode]:
            print(f"| {mode} | {lv['clients']} | {lv['requests']} | {lv['requests_per_s']:.2f} | "
                  f"{lv['tokens_per_s']:.0f} | {lv['p50_s']:.2f} | {lv['p99_s']:.2f} | {lv['errors']} | "
                  f"{lv['requests_per_network_call']:.1f} | {lv['server_cpu_ms_per_request']:.0f} |")
    print("\n| mode | RSS after warm-up MiB | RSS after the last level MiB |")
    print("|---|---|---|")
    for mode in modes:
        print(f"| {mode} | {rss_before[mode]:.0f} | {rss_after[mode]:.0f} |")
    print("\nbatched / serial requests/s (medians over rounds): " + ", ".join(
        f"{b['clients']} clients {b['requests_per_s'] / s['requests_per_s']:.2f}x"
        for b, s in zip(levels["batched"], levels["serial"])))
    print("serial / batched server CPU per request: " + ", ".join(
        f"{b['clients']} clients {s['server_cpu_ms_per_request'] / b['server_cpu_ms_per_request']:.2f}x"
        for b, s in zip(levels["batched"], levels["serial"])))
    errors = sum(lv["errors"] for mode in modes for lv in levels[mode])
    print(f"errors in all: {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "args": vars(args), "levels": levels,
                                               "rss_before_mib": rss_before, "rss_after_mib": rss_after}, indent=1))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
