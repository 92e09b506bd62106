"""Serving latency under concurrency: micro-batched generation vs. one request at a time, per engine.

Live servers (uvicorn on 127.0.0.1, memory on, no match) run side by side in one process,
for each engine of `--engine` (hf: HF `generate`; ct2: CTranslate2; hf+ct2: lone requests on
CTranslate2, micro-batches on HF; `engine: auto` picks one of the three per CPU): `max_batch=1`
(generation serialized; for hf+ct2 that is CTranslate2 alone) and the default micro-batcher
(`max_batch` 16, 5 ms window). For 1, 16 and 100 concurrent clients, each client sends
`--requests` greedy chat requests back to back over HTTP; the servers take turns,
`--rounds` times, in alternating order, so a change in the machine's load hits all alike.
Per-request latency p50 / p99 (over all rounds) and throughput are reported side by side,
with the batched speed-up per engine and, beside hf, ct2's and hf+ct2's p50 and throughput over hf's.

    python bench/serve_latency.py [--model tiny] [--engine hf,ct2] [--clients 1,16,100] [--requests 2] [--rounds 3]
Results: bench/results/serve_latency.json. Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from common import RESULTS, percentiles, prepare_serving, save_results

BATCHING = {"serialized": 1, "batched": 16}  # max_batch of the two servers per engine


def run_clients(
    url: str, model: str, clients: int, requests: int, max_tokens: int, question: str = "name a colour."
) -> tuple[list[float], float]:
    """(latency of every request, wall time of the whole run)."""
    import httpx

    def client(i: int) -> list[float]:
        out = []
        with httpx.Client(timeout=600) as http:
            for j in range(requests):
                body = {
                    "model": model,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"Client {i} asks question {j}: {question}"}],
                }
                t = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                out.append(time.perf_counter() - t)
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = [s for per_client in pool.map(client, range(clients)) for s in per_client]
    return samples, time.perf_counter() - start


def bench(model: str, clients: list[int], requests: int, max_tokens: int, rounds: int, engines: list[str], question: str) -> dict:
    import os

    import torch

    from serving.local import ServerThread
    from serving.service import ServeSettings

    result: dict = {
        "model": model,
        "max_tokens": max_tokens,
        "question": question,
        "requests_per_client": requests,
        "rounds": rounds,
        "engines": engines,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "results": {},
    }
    modes = {f"{engine}-{kind}": (engine, max_batch) for engine in engines for kind, max_batch in BATCHING.items()}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                ServerThread(ServeSettings(model=model, memory=str(Path(tmp) / f"{mode}.db"), max_batch=max_batch, engine=engine))
            )
            for mode, (engine, max_batch) in modes.items()
        }
        for server in servers.values():
            run_clients(server.url, model, 2, 1, max_tokens)  # warm up
        for n in clients:
            samples: dict[str, list[float]] = {m: [] for m in modes}
            wall = dict.fromkeys(modes, 0.0)
            for r in range(rounds):
                for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
                    got, seconds = run_clients(servers[mode].url, model, n, requests, max_tokens, question)
                    samples[mode] += got
                    wall[mode] += seconds
            row = {
                m: {**percentiles(samples[m]), "requests": len(samples[m]), "requests_per_s": round(len(samples[m]) / wall[m], 2)}
                for m in modes
            }
            for engine in engines:
                serialized, batched = row[f"{engine}-serialized"], row[f"{engine}-batched"]
                row[f"{engine}_p50_speedup"] = round(serialized["p50_ms"] / batched["p50_ms"], 2)
                row[f"{engine}_p99_speedup"] = round(serialized["p99_ms"] / batched["p99_ms"], 2)
            for other in ("ct2", "hf+ct2"):
                if {"hf", other} <= set(engines):
                    row[f"{other}_over_hf_batched_p50"] = round(
                        row["hf-batched"]["p50_ms"] / row[f"{other}-batched"]["p50_ms"], 2
                    )
                    row[f"{other}_over_hf_batched_throughput"] = round(
                        row[f"{other}-batched"]["requests_per_s"] / row["hf-batched"]["requests_per_s"], 2
                    )
            row["load_average"] = round(os.getloadavg()[0], 1)
            result["results"][str(n)] = row
            print(n, json.dumps(row), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", default="1,16,100")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--question",
        default="name a colour.",
        help="what each request asks (the default's replies are a few tokens; 'explain how rainbows form.' runs to the budget)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 avoids OpenMP spin-waiting on a machine shared with other jobs)",
    )
    parser.add_argument(
        "--engine",
        default="hf",
        help="comma-separated serve engines to compare: hf, ct2, hf+ct2 (e.g. hf,ct2,hf+ct2; auto is one of them)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_latency.json")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or any(e not in ("hf", "ct2", "hf+ct2") for e in engines):
        parser.error(f"--engine: a comma-separated list of hf, ct2 and hf+ct2 (got {args.engine!r})")
    prepare_serving(args.model, args.threads)
    if args.threads:
        import os

        os.environ["HEEDFUL_NUM_THREADS"] = str(args.threads)  # the ct2 engine's threads, as torch's
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    save_results(bench(args.model, clients, args.requests, args.max_tokens, args.rounds, engines, args.question), args.out)


if __name__ == "__main__":
    main()
