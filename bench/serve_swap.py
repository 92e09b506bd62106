"""Serving latency through a hot swap: before, during and after a deploy of a new adapter, and a rollback.

Why: a deploy loads a second copy of base + adapter *beside* the served one (serving.versions),
on the same CPUs that answer requests; this measures what that costs the clients, and shows
that no request fails across the switch.

One live server (uvicorn on 127.0.0.1, memory on, no match) takes greedy chat requests from
`--clients` concurrent clients, back to back, for the whole run. Meanwhile the script waits
`--phase-s`, deploys a new adapter (`POST /v1/admin/adapters`: load off to the side, then
switch), waits, rolls back (the previous version is still loaded: a reference swap), waits.
A request belongs to `deploy` or `rollback` when it overlaps that admin call, else to the
phase its start falls in (`before`, `after_deploy`, `after_rollback`). Reported per phase:
p50 / p99 / max latency, requests, errors (expected: none), the versions that answered; and
how long each admin call took. Latency of the `--rounds` repetitions is pooled.

    python bench/serve_swap.py [--model tiny] [--clients 8] [--phase-s 8] [--max-tokens 16] [--rounds 2]
Results: bench/results/serve_swap.json. Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, percentiles, prepare_serving, save_results

PHASES = ("before", "deploy", "after_deploy", "rollback", "after_rollback")


@dataclass
class Sample:
    start: float
    end: float
    version: str | None  # None: the request failed
    error: str | None = None


def client_loop(url: str, model: str, i: int, max_tokens: int, stop: threading.Event, out: list[Sample]) -> None:
    import httpx

    with httpx.Client(timeout=600) as http:
        j = 0
        while not stop.is_set():
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "user": f"client-{i}",
                "messages": [{"role": "user", "content": f"Client {i} asks question {j}: name a colour."}],
            }
            t = time.perf_counter()
            try:
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                out.append(Sample(t, time.perf_counter(), r.json()["adapter_version"]))
            except Exception as exc:  # noqa: BLE001 - a failed request is a finding, counted per phase
                out.append(Sample(t, time.perf_counter(), None, f"{type(exc).__name__}: {exc}"))
            j += 1


def admin_call(url: str, path: str, body: dict) -> tuple[float, float, dict]:
    import httpx

    t = time.perf_counter()
    r = httpx.post(url + path, json=body, timeout=600)
    r.raise_for_status()
    return t, time.perf_counter(), r.json()


def phase_of(s: Sample, windows: dict[str, tuple[float, float]]) -> str:
    """The swap a request overlaps, else the quiet phase its start falls in."""
    for name in ("deploy", "rollback"):
        a, b = windows[name]
        if s.start < b and s.end > a:
            return name
    if s.start < windows["deploy"][0]:
        return "before"
    return "after_deploy" if s.start < windows["rollback"][0] else "after_rollback"


def one_round(url: str, model: str, adapter: Path, clients: int, phase_s: float, max_tokens: int) -> dict:
    samples: list[Sample] = []
    stop = threading.Event()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, url, model, i, max_tokens, stop, samples) for i in range(clients)]
        time.sleep(phase_s)
        d0, d1, deployed = admin_call(url, "/v1/admin/adapters", {"adapter": str(adapter)})
        time.sleep(phase_s)
        r0, r1, rolled = admin_call(url, "/v1/admin/adapters/rollback", {})
        time.sleep(phase_s)
        stop.set()
        for f in futures:
            f.result()
    windows = {"deploy": (d0, d1), "rollback": (r0, r1)}
    by_phase: dict[str, list[Sample]] = {p: [] for p in PHASES}
    for s in samples:
        by_phase[phase_of(s, windows)].append(s)
    return {
        "by_phase": by_phase,
        "deploy_s": d1 - d0,
        "rollback_s": r1 - r0,
        "versions": {"base": deployed["previous"], "new": deployed["active"]["id"], "after_rollback": rolled["active"]["id"]},
    }


def bench(model: str, clients: int, phase_s: float, max_tokens: int, rounds: int) -> dict:
    import torch

    from serving.local import ServerThread, random_lora_adapter
    from serving.service import ServeSettings

    result: dict = {
        "model": model,
        "clients": clients,
        "phase_s": phase_s,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
    }
    pooled: dict[str, list[Sample]] = {p: [] for p in PHASES}
    swaps = []
    with tempfile.TemporaryDirectory() as tmp:
        # a new adapter each round: one deployed again while still loaded would be switched to without a load
        adapters = [random_lora_adapter(Path(tmp) / f"adapter{r}", seed=r, model=model) for r in range(rounds)]
        with ServerThread(ServeSettings(model=model, memory=str(Path(tmp) / "memory.db"))) as server:
            stop = threading.Event()
            warm: list[Sample] = []
            threading.Timer(2.0, stop.set).start()
            client_loop(server.url, model, 0, max_tokens, stop, warm)  # warm up
            for adapter in adapters:
                got = one_round(server.url, model, adapter, clients, phase_s, max_tokens)
                for p in PHASES:
                    pooled[p] += got["by_phase"][p]
                swaps.append(
                    {"deploy_s": round(got["deploy_s"], 3), "rollback_s": round(got["rollback_s"], 3), **got["versions"]}
                )
    result["swaps"] = swaps
    result["phases"] = {}
    for p in PHASES:
        ok = [s.end - s.start for s in pooled[p] if s.version is not None]
        result["phases"][p] = {
            **(percentiles(ok) if ok else {}),
            "max_ms": round(max(ok) * 1000, 1) if ok else None,
            "requests": len(pooled[p]),
            "errors": sum(s.version is None for s in pooled[p]),
            "first_errors": [s.error for s in pooled[p] if s.error][:3],
            "versions": sorted({s.version for s in pooled[p] if s.version}),
        }
    result["load_average_at_end"] = os.getloadavg()[0]
    return result


def print_table(result: dict) -> None:
    print(f"\n{'phase':15s} {'requests':>8s} {'errors':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}  versions")
    for p, row in result["phases"].items():
        print(
            f"{p:15s} {row['requests']:8d} {row['errors']:6d} {row.get('p50_ms', float('nan')):8.1f} "
            f"{row.get('p99_ms', float('nan')):8.1f} {row['max_ms'] or float('nan'):8.1f}  {', '.join(row['versions'])}"
        )
    for i, swap in enumerate(result["swaps"]):
        print(
            f"round {i}: deploy {swap['deploy_s']:.2f} s ({swap['base']} -> {swap['new']}), rollback {swap['rollback_s']:.3f} s"
        )
    print(f"load average: {result['load_average_at_start']:.1f} at start, {result['load_average_at_end']:.1f} at end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds of traffic before, between and after the swaps")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_swap.json")
    args = parser.parse_args()
    prepare_serving(args.model, args.threads)
    result = bench(args.model, args.clients, args.phase_s, args.max_tokens, args.rounds)
    save_results(result, args.out)
    print_table(result)


if __name__ == "__main__":
    main()
