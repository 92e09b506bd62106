"""Argilla I/O: stack start-up time, push and pull of 2,000 fine-grained records.

Baselines, on the same server in the same run:
- push: the plain SDK (`dataset.records.log(records)`, its default batch of 256) with the
  very same `rg.Record` objects, into a twin dataset;
- pull: the plain SDK iterating the submitted records (`dataset.records(query=...)`), which
  gives SDK objects but no response timestamps (heedful reads raw JSON to keep them, then
  validates every span into pipeline/schema records).

The 2,000 texts are real: the 4 model answers and the gold answer of the 400 qa-feedback
questions. Each record carries one submitted annotator response (spans + corrected text).
Run: `flock /tmp/heedful-cpu.lock .venv/bin/python bench/argilla_io.py`
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from common import QA, ROOT

N = 2000


def items():
    from feedback.argilla_templates import PushItem

    rows = json.loads(QA.read_text())
    texts = [
        (r["question"], r[key], n)
        for n, r in enumerate(rows)
        for key in ("prediction 1", "prediction 2", "prediction 3", "prediction 4", "gold")
    ]
    out = []
    for k, (question, text, n) in enumerate(texts[:N]):
        cut = text.find(" ", 10) if text.find(" ", 10) > 0 else len(text)
        values = {"spans": [{"label": "irrelevant", "start": 0, "end": cut}], "corrected_response": text[cut:]}
        out.append(
            PushItem(
                id=f"bench{k:05d}",
                prompt=question,
                response=text,
                metadata={"model": "bench", "sample_id": f"qa{n:04d}"},
                responses=[{"user": "bench-annotator", "values": values}],
            )
        )
    return out


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="heedful-argilla-bench-"))
    os.environ["HEEDFUL_ARGILLA_HOME"] = str(home)
    for var in ("ARGILLA_API_URL", "ARGILLA_API_KEY", "HEEDFUL_ARGILLA_API_URL", "HEEDFUL_ARGILLA_API_KEY_FILE"):
        os.environ.pop(var, None)
    import argilla as rg

    from feedback import argilla_stack
    from feedback.argilla_client import connect
    from feedback.argilla_sync import ensure_dataset, ensure_user, pull, push_items
    from feedback.argilla_templates import TemplateOptions, to_record

    results: dict = {"records": N, "host": platform.node(), "cpus": os.cpu_count()}
    port = argilla_stack._free_port()
    t = time.time()
    argilla_stack.up(port=port)
    results["startup_cold_s"] = round(time.time() - t, 2)  # empty database: every migration runs
    try:
        client = connect()
        data = items()
        opts = TemplateOptions(kind="fine_grained")
        res = push_items(client, "bench", "heedful", opts, data)
        results["push_records_per_s"] = round(N / res.seconds, 1)
        results["push_s"] = round(res.seconds, 2)
        again = push_items(client, "bench", "heedful", opts, data)
        assert (again.created, again.updated) == (0, N), (again.created, again.updated)
        results["repush_records_per_s"] = round(N / again.seconds, 1)

        # baseline push: the plain SDK with the same records, into a twin dataset
        twin = ensure_dataset(client, "bench-sdk", "heedful", opts)
        uid, _ = ensure_user(client, "bench-annotator", "heedful")
        records = [to_record(item, opts, {"bench-annotator": uid}) for item in data]
        t = time.time()
        twin.records.log(records)
        sdk_push = time.time() - t
        results["sdk_push_records_per_s"] = round(N / sdk_push, 1)
        results["push_ratio_vs_sdk"] = round(sdk_push / res.seconds, 2)

        t = time.time()
        pulled = pull(client, "bench", "heedful")
        pull_s = time.time() - t
        assert len(pulled.records) == N and not pulled.invalid
        results["pull_records_per_s"] = round(N / pull_s, 1)
        t = time.time()
        nothing_new = pull(client, "bench", "heedful", cursor=pulled.cursor)
        results["incremental_pull_nothing_new_s"] = round(time.time() - t, 2)
        assert nothing_new.records == [] and nothing_new.already_pulled == N

        ds = client.datasets("bench", workspace="heedful")
        query = rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))
        t = time.time()
        sdk_records = list(ds.records(query=query, with_responses=True, batch_size=1000))
        sdk_pull = time.time() - t
        assert len(sdk_records) == N
        results["sdk_pull_records_per_s"] = round(N / sdk_pull, 1)
        results["pull_ratio_vs_sdk"] = round(sdk_pull / pull_s, 2)
    finally:
        argilla_stack.down()
        _save(results)
    t = time.time()
    argilla_stack.up(port=port)  # warm: database exists, the in-memory index is rebuilt from it
    results["startup_warm_reindex_2x2000_s"] = round(time.time() - t, 2)
    argilla_stack.down(purge=True)
    shutil.rmtree(home, ignore_errors=True)

    _save(results)
    print(json.dumps(results, indent=2))
    print(
        f"push {results['push_records_per_s']} records/s ({results['push_ratio_vs_sdk']}x the plain SDK), "
        f"pull {results['pull_records_per_s']} records/s ({results['pull_ratio_vs_sdk']}x the plain SDK), "
        f"start-up {results['startup_cold_s']}s cold / {results['startup_warm_reindex_2x2000_s']}s warm"
    )


def _save(results: dict) -> None:
    out = ROOT / "bench" / "results" / "argilla_io.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
