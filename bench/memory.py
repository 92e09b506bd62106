"""MemPrompt memory benchmark: retrieval latency as memory grows, and what memory costs a request.

1. Retrieval p50/p99 at 1k, 10k, 100k memories, HNSW (hnswlib) vs. brute force (one
   numpy matrix-vector product, the strongest exact baseline on CPU), on real
   all-MiniLM-L6-v2 embeddings of distinct lexical queries (phrasings x words of the
   shipped WordNet sample x prefixes). Reported twice: the index search alone (query
   already embedded) and the whole `Retriever.lookup` (embed the query + search + read the entry from SQLite).
   HNSW recall@1 against brute force is reported next to its speed.
2. Serving overhead: the same chat request to a live server (uvicorn, SmolLM2-135M,
   10k memories) with memory off, with memory on but no match, and with a match (the
   prompt grows by the clarification).

    python bench/memory.py [--sizes 1000,10000,100000] [--queries 300] [--requests 15]
Results: bench/results/memory.json (embeddings are cached in bench/results/cache/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, percentiles

PREFIXES = [
    "",
    "Quick question: ",
    "Hey, ",
    "Please tell me: ",
    "I wonder, ",
    "Help me out: ",
    "Tell me: ",
    "One more: ",
    "Curious: ",
    "Teacher asks: ",
    "Riddle: ",
    "Homework: ",
]


def key_strings(limit: int) -> list[str]:
    from serving.stream_eval import PHRASINGS

    words = []
    for line in (ROOT / "data" / "memprompt" / "wordnet_stream.jsonl").read_text().splitlines():
        row = json.loads(line)
        words += [row["meta"]["word1"], row["meta"]["word2"]]
    words = list(dict.fromkeys(words))
    phrasings = [p for group in PHRASINGS.values() for p in group]
    out = []
    for prefix in PREFIXES:
        for word in words:
            for p in phrasings:
                out.append(prefix + p.replace("{w}", word))
                if len(out) >= limit:
                    return out
    raise SystemExit(f"only {len(out)} distinct keys available, asked for {limit}")


def embeddings(embedder, texts: list[str], name: str) -> np.ndarray:
    cache = RESULTS / "cache" / f"{name}.npy"
    # keys are generated in a fixed order, so a larger cache's first rows are these keys
    for path in sorted((RESULTS / "cache").glob("keys_*.npy")):
        arr = np.load(path, mmap_mode="r")
        if len(arr) >= len(texts):
            return np.array(arr[: len(texts)])
    start = time.perf_counter()
    arr = embedder.encode(texts, batch_size=256)
    print(f"  embedded {len(texts)} keys in {time.perf_counter() - start:.1f}s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, arr)
    return arr


def pct(samples: list[float]) -> dict[str, float]:
    """Retrieval latencies are sub-millisecond: 4 digits."""
    return percentiles(samples, digits=4)


def bench_retrieval(sizes: list[int], n_queries: int) -> list[dict]:
    import torch

    from serving.embedder import MiniLMEmbedder
    from serving.index import VectorIndex
    from serving.retrieval import RetrievalSettings, Retriever
    from serving.store import MemoryStore

    embedder = MiniLMEmbedder()
    keys = key_strings(max(sizes))
    vectors = embeddings(embedder, keys, f"keys_{len(keys)}")
    # held-out queries: phrasings over words that are not in any key
    queries = [
        f"What is akin to < qword{i} > ?"
        if i % 3 == 0
        else (f"Which word is the reverse of < zz{i} > ?" if i % 3 == 1 else f"Could you define < yy{i} > ?")
        for i in range(n_queries)
    ]
    qvecs = embedder.encode(queries)
    rows = []
    for n in sizes:
        print(f"memories: {n}", flush=True)
        exact = VectorIndex(embedder.dim, ann_threshold=10**12)
        ann = VectorIndex(embedder.dim, ann_threshold=0)
        ids = np.arange(1, n + 1)
        t = time.perf_counter()
        exact.add(ids, vectors[:n])
        exact_build = time.perf_counter() - t
        t = time.perf_counter()
        ann.add(ids, vectors[:n])
        ann_build = time.perf_counter() - t
        for index in (exact, ann):  # warm up
            for q in qvecs[:10]:
                index.search(q, 1)
        timings = {}
        tops = {}
        for name, index in (("exact", exact), ("hnsw", ann)):
            samples, top = [], []
            for q in qvecs:
                t = time.perf_counter()
                hit = index.search(q, 8)
                samples.append(time.perf_counter() - t)
                top.append(hit[0][0])
            timings[name], tops[name] = pct(samples), top
        recall = float(np.mean([a == b for a, b in zip(tops["exact"], tops["hnsw"])]))
        # end to end: Retriever.lookup over a real SQLite store of n entries
        e2e = {}
        with tempfile.TemporaryDirectory() as tmp:
            store = MemoryStore(Path(tmp) / "m.db", embedder_name=embedder.name, dim=embedder.dim)
            store.add_many([{"key_query": k, "clarification": f"clarification {i}"} for i, k in enumerate(keys[:n])], vectors[:n])
            for name, threshold in (("exact", 10**12), ("hnsw", 0)):
                retriever = Retriever(
                    store,
                    embedder,
                    RetrievalSettings(threshold=0.0, ann_threshold=threshold, lexical_fallback=False, scope="global"),
                )
                for q in queries[:10]:
                    retriever.lookup(q)
                samples = []
                for q in queries:
                    t = time.perf_counter()
                    retriever.lookup(q)
                    samples.append(time.perf_counter() - t)
                e2e[name] = pct(samples)
            store.close()
        row = {
            "memories": n,
            "index_search": timings,
            "lookup_end_to_end": e2e,
            "hnsw_recall_at_1": round(recall, 4),
            "build_seconds": {"exact": round(exact_build, 3), "hnsw": round(ann_build, 3)},
            "hnsw_speedup_p50": round(timings["exact"]["p50_ms"] / timings["hnsw"]["p50_ms"], 2),
            "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_serving(n_memories: int, n_requests: int) -> dict:
    import httpx

    from serving.embedder import MiniLMEmbedder
    from serving.local import ServerThread
    from serving.retrieval import RetrievalSettings
    from serving.service import ServeSettings

    embedder = MiniLMEmbedder()
    keys = key_strings(n_memories)
    vectors = embeddings(embedder, keys, f"keys_{len(keys)}")
    with tempfile.TemporaryDirectory() as tmp:
        from serving.store import MemoryStore

        store = MemoryStore(Path(tmp) / "m.db", embedder_name=embedder.name, dim=embedder.dim)
        store.add_many(
            [{"key_query": k, "clarification": f"when I ask like this, I want clarification {i}."} for i, k in enumerate(keys)],
            vectors,
        )
        store.close()
        settings = ServeSettings(
            model="smollm2-135m",
            memory=str(Path(tmp) / "m.db"),
            retrieval=RetrievalSettings(threshold=0.9, lexical_fallback=False),
        )
        with ServerThread(settings) as server:

            def ask(content: str, memory: bool) -> tuple[float, dict]:
                body = {
                    "model": "smollm2-135m",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 16,
                    "temperature": 0,
                    "memory": memory,
                }
                t = time.perf_counter()
                r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                r.raise_for_status()
                return time.perf_counter() - t, r.json()

            hit_q = keys[5]  # a stored key: retrieved, the prompt gets its clarification
            miss_q = "Write one sentence about the history of the bicycle."
            for q, m in ((hit_q, True), (miss_q, True), (hit_q, False)):
                ask(q, m)  # warm up
            cases = {
                "memory_off": (hit_q, False),
                "memory_on_miss": (miss_q, True),
                "memory_on_hit": (hit_q, True),
                "memory_off_miss_query": (miss_q, False),
            }
            out = {}
            for name, (q, m) in cases.items():
                samples, tokens, used = [], [], 0
                for _ in range(n_requests):
                    s, body = ask(q, m)
                    samples.append(s)
                    tokens.append(body["usage"]["prompt_tokens"])
                    used += bool(body["memory"])
                out[name] = {**pct(samples), "prompt_tokens": int(np.mean(tokens)), "memory_used": used}
                print(name, json.dumps(out[name]), flush=True)
    out["memories"] = n_memories
    out["overhead_miss_vs_off_p50_ms"] = round(out["memory_on_miss"]["p50_ms"] - out["memory_off_miss_query"]["p50_ms"], 2)
    out["overhead_hit_vs_off_p50_ms"] = round(out["memory_on_hit"]["p50_ms"] - out["memory_off"]["p50_ms"], 2)
    out["ratio_hit_vs_off_p50"] = round(out["memory_on_hit"]["p50_ms"] / out["memory_off"]["p50_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--serving-memories", type=int, default=10000)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "memory.json"
    result = json.loads(out.read_text()) if out.is_file() else {}  # a skipped part keeps its last result
    result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    if not args.skip_retrieval:
        result["retrieval"] = bench_retrieval([int(s) for s in args.sizes.split(",")], args.queries)
    if not args.skip_serving:
        result["serving"] = bench_serving(args.serving_memories, args.requests)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
