"""Which CPU engine writes replies faster on this machine: measured once per host and model.

Why not a fixed choice: on the same SmolLM2-135M, 2 threads, greedy, CTranslate2 was 1.0-1.3x
HF `generate` on an AMD EPYC (AVX-512) and 0.64-0.89x on a Xeon with AMX (batches 8 to 64,
bench/generate.py, docs/generation.md): PyTorch's kernels won there. So `engine: auto` on a
CPU times both engines on a small fixed batch the first time a model is used on a host, keeps
CTranslate2 only if it is at least `MARGIN` faster (it costs a conversion and a second copy of
the weights), and remembers the answer in `<heedful cache>/cache/engine_probe.json`, keyed by
hostname + CPU model + model name + thread count (as trainers/grad_ckpt_probe.py keys its
answers) and the dtype HF computes in. In fp32 both engines write the same greedy replies (tests/test_ct2_engine.py), so the choice changes
speed, not results; sampled replies differ between engines as between machines. On a CPU where
heedful computes in bf16 (pipeline/precision.py) HF runs bf16 and CTranslate2 fp32, and greedy
replies can differ at near-ties.

A job too small to repay the probe (fewer than `PROBE_PAYS_FROM` new tokens: the quickstart's 12
replies, or its simulated users' conversations) is not a reason to measure: it takes the answer
already known, else HF generate (`known_cpu_engine`; a stage's probe, its conversion and two timed
batches per engine, cost about 3,300 tokens of HF generate on an AMX Xeon, and
CTranslate2 was at most ~1.5x faster where it won).

One request at a time is a different workload: on a 2-core Xeon with AMX (HF in bf16), the probe
found the two engines level on its batch of 8 (CTranslate2 1.01x HF: HF kept) and CTranslate2
1.57x HF for a lone request (1.7-1.8x over 64-token replies; docs/generation.md). So a server's
probe also times one request alone on each engine (HF with its packed weights already in hand, as a
server holds them; a stage's probe does not: 8 of the probe's 23 s on SmolLM2 that a stage's first
run would pay for nothing), and `serving_cpu_engine` answers for `heedful serve`, whose requests come alone or in
micro-batches: 'ct2' where it wins batches, 'hf+ct2' where it wins only lone requests (the server
holds both: lone requests and streams on CTranslate2, micro-batches on HF), else 'hf'. An answer
cached before lone requests were timed serves the stages as it is and is measured again for a server.

Timed while the machine is busy (other processes, a VM neighbour: pipeline/host_load.py), the
answer is used but cached as provisional, and measured again by the first probe that finds the
machine idle; a stage that only reads known answers (`known_cpu_engine`) takes it as it is.

`HEEDFUL_CPU_ENGINE=ct2|hf` answers without measuring (a fleet that knows its machines, or
tests that need one engine); `engine: ct2|hf` in a config insists regardless.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from trainers.grad_ckpt_probe import cached_entry, known_entry, measure, probe_key, stamp, store

CACHE_NAME = "engine_probe.json"
ENV = "HEEDFUL_CPU_ENGINE"
#: CTranslate2 is chosen only when it writes at least this many times HF's tokens per second
MARGIN = 1.1
#: the HF side's code as measured: bump when chat_generate gets faster, so cached answers are measured
#: again (2: bf16 layers on packed weights, pipeline/cpu_linear.py)
HF_PATH = "hf-path=2"
#: the probe's workload: a batch of short chat prompts, greedy, this many new tokens each
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for a job interview.",
    "How do I boil an egg?",
    "Explain what a prime number is.",
    "Name a good book for a long flight.",
    "Why is the sky blue?",
    "How can I save money on groceries?",
    "What should I pack for a weekend hike?",
)
PROBE_TOKENS = 24
#: a job asking for fewer new tokens than this does not start a probe (see above)
PROBE_PAYS_FROM = 4096

log = logging.getLogger(__name__)


def default_cache_path() -> Path:
    from pipeline.paths import cache_dir

    return cache_dir() / CACHE_NAME


def forced_engine() -> str | None:
    """HEEDFUL_CPU_ENGINE's answer, or None when it is unset (a bad value is an error naming it)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("ct2", "hf"):
        raise ValueError(f"{ENV}={value!r}: expected ct2, hf or auto")
    return value


def known_cpu_engine(model_name: str, *, cache_path: Path | None = None) -> str | None:
    """HEEDFUL_CPU_ENGINE's answer or the probe's cached one for `model_name` on this host; None
    when neither exists (nothing is measured)."""
    if (forced := forced_engine()) is not None:
        return forced
    from pipeline.precision import known_cpu_precision

    if (precision := known_cpu_precision()) is None:  # the HF side's dtype is not known yet: neither is the answer
        return None
    path = cache_path or default_cache_path()
    known = known_entry(path, _key(model_name, precision))
    return None if known is None else str(known["engine"])


def _key(model_name: str, precision: str) -> str:
    import torch

    # the threads each engine gets (pipeline/threads.py) change the answer: one thread beside a busy
    # process is not two on an idle machine; and so does the dtype HF computes in (`precision`: bf16 on
    # a CPU with bf16 units, pipeline/precision.py); `HF_PATH` names what the HF side runs, so an answer
    # measured before it changed is measured again
    return probe_key(model_name, f"generate|threads={torch.get_num_threads()}|hf={precision}|{HF_PATH}")


def faster_cpu_engine(model_name: str, *, cache_path: Path | None = None) -> str:
    """'ct2' or 'hf' for `model_name` on this host: HEEDFUL_CPU_ENGINE, else the cached answer,
    else measured now (both engines, the same prompts, alternating; best of two) and cached; a
    provisional answer (measured busy) is measured again if the machine is idle now."""
    if (forced := forced_engine()) is not None:
        return forced
    return str(_probed(model_name, cache_path)["engine"])


def serving_cpu_engine(model_name: str, *, cache_path: Path | None = None) -> str:
    """The engines `heedful serve` holds for `model_name` on this CPU: 'ct2' (CTranslate2 wins
    batches), 'hf+ct2' (it wins only lone requests: those, and streams, go to CTranslate2 and
    micro-batches to HF) or 'hf'. HEEDFUL_CPU_ENGINE answers first; else the probe's answer, measured
    now if unknown or cached before lone requests were timed (the stages' answer is kept meanwhile)."""
    if (forced := forced_engine()) is not None:
        return forced
    entry = _probed(model_name, cache_path, lone_request=True)
    if entry["engine"] == "ct2":
        return "ct2"
    return "hf+ct2" if entry.get("single") == "ct2" else "hf"


def _probed(model_name: str, cache_path: Path | None, lone_request: bool = False) -> dict:
    """The probe's entry for `model_name` on this host: the cached one, else measured now and cached
    (under a file lock: two processes starting at once measure once). `lone_request`: an entry
    without a lone request's timing (cached before the probe took one) is measured again, and the
    batch answer it had (the stages') is kept, with the lone request's answer added."""
    from filelock import FileLock

    from pipeline.precision import cpu_precision

    path = cache_path or default_cache_path()
    key = _key(model_name, cpu_precision())

    def accept(entry: dict) -> bool:
        return not lone_request or "single" in entry

    if (entry := cached_entry(path, key, accept)) is not None:
        return entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (entry := cached_entry(path, key, accept)) is not None:
            return entry
        earlier = known_entry(path, key)  # an answer without a lone request's timing: the stages' to keep
        earlier = earlier if earlier is not None and not earlier.get("contended") else None
        # the batches are timed unless an uncontended answer is kept; lone requests only for a server
        measured = _measure(model_name, batch=earlier is None, lone=lone_request)
        load = measured.pop("load", None)  # the machine's load while the batches were timed
        seconds = dict(measured)
        if earlier is None:
            speedup = seconds["hf"] / seconds["ct2"]
            entry = {"engine": "ct2" if speedup >= MARGIN else "hf", "ct2_vs_hf": round(speedup, 3)}
            log.info(
                "engine probe (%s): HF %.2f s, CTranslate2 %.2f s for %d x %d tokens -> %s",
                model_name,
                seconds["hf"],
                seconds["ct2"],
                len(PROBE_PROMPTS),
                PROBE_TOKENS,
                entry["engine"],
            )
        else:  # the batch answer stays what the stages have used
            entry = {"engine": earlier["engine"], "ct2_vs_hf": earlier["ct2_vs_hf"]}
            seconds.update({k: earlier["seconds"][k] for k in ("hf", "ct2") if k in earlier.get("seconds", {})})
        entry.update(seconds=seconds, measured=time.time())
        if "hf_single" in seconds:
            single = seconds["hf_single"] / seconds["ct2_single"]
            entry.update(single="ct2" if single >= MARGIN else "hf", single_ct2_vs_hf=round(single, 3))
            log.info("engine probe (%s), one request alone: CTranslate2 %.2fx HF", model_name, single)
        store(path, key, stamp(entry, load, path, key, "engine", log), over_idle=earlier is not None, log=log)
    return entry


def _measure(model_name: str, batch: bool = True, lone: bool = True) -> dict:
    """Seconds per batch for HF generate and CTranslate2 on the probe's workload (`hf`, `ct2`;
    `batch`), for two of its prompts one after the other, alone (`hf_single`, `ct2_single`; `lone`:
    only a server asks, so a stage's first run does not pay for them), and the machine's `load`
    (pipeline/host_load.py) while they were timed: loading and converting the model are not, so a
    neighbour busy only during the timing is not averaged away."""
    from pipeline.chat import as_messages
    from pipeline.cpu_linear import packed_linears
    from pipeline.ct2_engine import Ct2Generator
    from pipeline.generation import SamplingSettings, chat_generate
    from pipeline.host_load import watch
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    sampling = SamplingSettings(max_new_tokens=PROBE_TOKENS, temperature=0.0)
    conversations = [as_messages(p) for p in PROBE_PROMPTS]
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, device_policy("cpu")).eval()
    ct2 = Ct2Generator(model_name)  # converts once (cached): not part of the timing

    def step(use_ct2: bool) -> None:
        if use_ct2:
            ct2.generate(conversations, sampling, batch_size=len(conversations))
        else:
            chat_generate(model, tokenizer, conversations, sampling, 1, len(conversations))

    def alone(use_ct2: bool) -> None:
        for conversation in conversations[:2]:
            if use_ct2:
                ct2.generate([conversation], sampling, batch_size=1)
            else:
                chat_generate(model, tokenizer, [conversation], sampling, 1, 1)

    seconds: dict = {}
    with watch() as seen:
        if batch:
            best = measure(step, repeats=1)  # a warm-up and one timed batch each: about ten seconds on SmolLM2-135M
            seconds.update(hf=round(best[False], 4), ct2=round(best[True], 4))
        if lone:
            with packed_linears(model):  # a server packs its weights once, not per request: not part of the time
                single = measure(alone, repeats=1)
            seconds.update(hf_single=round(single[False], 4), ct2_single=round(single[True], 4))
    return {**seconds, "load": seen.load}
