"""Choose gradient checkpointing per machine by measuring it, not by a fixed policy.

Why: recomputing activations in backward trades compute for memory. On one CPU it made a
DPO step 1.44x slower, on another 10% faster (cache effects of the smaller working set), and
on a GPU it is usually what lets the batch fit. So at stage start we time a couple of
forward+backward steps of the actual model on a batch of the actual shape, with and without
checkpointing, keep the faster, and remember the answer per host: the key is hostname + CPU
model + model name + shape bucket (device, dtype, rows, length rounded up to a power of 2),
stored in `<heedful cache>/cache/grad_ckpt_probe.json`. Later stages on the same host and
shape read it instead of measuring again. An answer measured while the machine was busy is
provisional (`trusted`, `stamp`; pipeline/host_load.py): measured again once the machine is idle,
by a later process (a process keeps the answer it used: `cached_entry`).

The probe itself costs about six forward+backward steps (a warm-up and two timed steps per
setting), so a run shorter than `PROBE_MIN_STEPS` optimizer steps (the quickstart trains
six) does not probe: it uses a cached answer if there is one, else the device policy's
setting (pipeline/models.py: off on CPU), and caches nothing.

`choose_gradient_checkpointing(model_name, shape, step)` is the generic entry: `step(on)`
runs one forward+backward with checkpointing on/off. `packed_dpo_step(model, batch)` builds
that step for the fast DPO core (trainers/fastpref); `FastDPOTrainer(probe_checkpointing=True)`
runs it on the longest pairs of its training set.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_NAME = "grad_ckpt_probe.json"
#: runs shorter than this many optimizer steps skip the probe (~6 steps: it would cost >= 1/4 of the run)
PROBE_MIN_STEPS = 24


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shape_bucket(device: str, dtype: str, rows: int, length: int) -> str:
    """Nearby shapes share one measurement: lengths round up to a power of two."""
    return f"{device}|{dtype}|rows={rows}|len<={2 ** max(0, math.ceil(math.log2(max(length, 1))))}"


def probe_key(model_name: str, bucket: str) -> str:
    return f"{socket.gethostname()}|{cpu_model()}|{model_name}|{bucket}"


def default_cache_path() -> Path:
    from pipeline.paths import cache_dir

    return cache_dir() / CACHE_NAME


def measure(step: Callable[[bool], None], repeats: int = 2) -> dict[bool, float]:
    """Best seconds per step for checkpointing off/on: one warm-up each, then alternating
    (off, on, on, off, ...) so a drift in machine speed hits both settings alike."""
    best = {False: math.inf, True: math.inf}
    step(False)
    step(True)
    for i in range(repeats):
        for on in (False, True) if i % 2 == 0 else (True, False):
            start = time.perf_counter()
            step(on)
            best[on] = min(best[on], time.perf_counter() - start)
    return best


#: the probe answers this process has used, by (cache file, key): one answer per process, whatever
#: other processes write to the file meanwhile (a stage does not load its policy in one precision and
#: its reward model in another). A long-lived process (a server, a reused Ray worker) keeps a
#: provisional answer for its life; other processes re-measure it when the machine is idle.
_answers: dict[tuple[str, str], dict] = {}


def _memo_key(path: Path, key: str) -> tuple[str, str]:
    return os.path.abspath(path), key


def _file_entry(path: Path, key: str) -> dict | None:
    """The file's entry for `key`; anything but a non-empty dict (a hand-edited file) counts as none."""
    entry = _read(path).get(key)
    return entry if isinstance(entry, dict) and entry else None


def known_entry(path: Path, key: str) -> dict | None:
    """The answer this process already used, else the file's entry as it is (provisional or not,
    then this process keeps it), without measuring or looking at the machine: what a reader that
    never measures takes."""
    memo = _memo_key(path, key)
    if memo not in _answers and (entry := _file_entry(path, key)) is not None:
        _answers[memo] = entry
    return _answers.get(memo)


def cached_entry(path: Path, key: str, accept=lambda entry: True) -> dict | None:
    """The answer to use without measuring: the one this process already used, else the file's
    entry when `trusted` (then this process keeps it); None when the caller should measure.
    `accept`: what the caller needs of an entry (a server: a lone request's timing); one without it
    is passed over, in the memo and in the file alike."""
    memo = _memo_key(path, key)
    if (remembered := _answers.get(memo)) is not None and accept(remembered):
        return remembered
    entry = _file_entry(path, key)
    if entry is None or not accept(entry) or not trusted(entry):
        return None
    _answers[memo] = entry
    return entry


def trusted(entry: dict) -> bool:
    """An entry measured on an idle machine, or a provisional one (measured busy: `contended`) while
    the machine is busy now too, when measuring again would be no better (pipeline/host_load.py). A
    provisional answer met on an idle machine is not: the caller measures again."""
    if not entry.get("contended"):
        return True
    from pipeline.host_load import sample

    now = sample()
    return now is None or now.contended


def stamp(entry: dict, load, path: Path, key: str, what: str, log=None) -> dict:
    """`entry` marked provisional (`contended`: the shares of other processes and steal) when `load`
    (a pipeline.host_load.Load, or None) says the machine was busy while it was measured; this
    process keeps it as its answer either way."""
    _answers[_memo_key(path, key)] = entry
    if load is not None and load.contended:
        entry["contended"] = load.as_dict()
        if log is not None:
            log.warning(
                "%s probe measured while the machine was busy (other processes %.0f%%, stolen %.0f%% of its CPU): "
                "answer kept as provisional, measured again when the machine is idle",
                what,
                100 * load.others,
                100 * load.steal,
            )
    return entry


def store(path: Path, key: str, entry: dict, *, over_idle: bool = False, log=None) -> None:
    """Write `entry` under `key` (re-reading the file: other keys may have been written meanwhile),
    except a provisional entry over an idle one that another process wrote since (`over_idle`: the
    caller measured because the idle entry lacked something, and carries its answer forward)."""
    data = _read(path)
    old = data.get(key)
    if entry.get("contended") and not over_idle and isinstance(old, dict) and old and not old.get("contended"):
        if log is not None:
            log.info("probe answer measured busy not written: %s keeps the idle answer another process measured", path.name)
        return
    data[key] = entry
    _write(path, data)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def choose_gradient_checkpointing(
    model_name: str,
    bucket: str,
    step: Callable[[bool], None],
    *,
    cache_path: Path | None = None,
    repeats: int = 2,
    log=None,
    run_steps: int | None = None,
    default: bool = False,
) -> bool:
    """True when checkpointing was faster for (this host, model, shape bucket); measured once, then cached.
    A run of fewer than PROBE_MIN_STEPS `run_steps` without a cached answer gets `default`, unmeasured."""
    path = cache_path or default_cache_path()
    key = probe_key(model_name, bucket)
    short = run_steps is not None and run_steps < PROBE_MIN_STEPS
    entry = known_entry(path, key) if short else cached_entry(path, key)  # a short run takes a provisional answer as it is
    if entry is not None:
        return bool(entry["checkpointing"])
    if short:
        if log is not None:
            log.info(
                "gradient checkpointing %s: a %d-step run is too short for the probe to pay off (< %d steps)",
                "on" if default else "off",
                run_steps,
                PROBE_MIN_STEPS,
            )
        return default
    import torch
    from filelock import FileLock

    from pipeline.host_load import watch

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # stages starting together measure one at a time, not beside each other
        if (entry := cached_entry(path, key)) is not None:
            return bool(entry["checkpointing"])
        try:
            with watch() as seen:
                times = measure(step, repeats)
        except (MemoryError, torch.OutOfMemoryError):  # the batch only fits with checkpointing (not cached: memory varies)
            return True
        choice = times[True] < times[False]
        entry = {
            "checkpointing": choice,
            "seconds_off": round(times[False], 4),
            "seconds_on": round(times[True], 4),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        store(path, key, stamp(entry, seen.load, path, key, "gradient checkpointing", log))
    if log is not None:
        log.info(
            "gradient checkpointing %s (probe: %.3fs off, %.3fs on per step)",
            "on" if choice else "off",
            times[False],
            times[True],
        )
    return choice


def set_checkpointing(model, on: bool) -> None:
    """Switch checkpointing on the (PEFT-wrapped) model; inputs need grads for it under PEFT."""
    from trainers.fastpref.logps import unwrap_peft

    base = unwrap_peft(model)
    if on and not base.is_gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    elif not on and base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def packed_dpo_step(model, batch: dict, attention: Any = "auto") -> Callable[[bool], None]:
    """One forward+backward of the fast DPO core on `batch` (a packed batch on the model's device),
    its packed attention as the trainer runs it (`attention`: trainers/fastpref/attention.py)."""
    from trainers.fastpref.logps import packed_logps

    def step(on: bool) -> None:
        was_training = model.training
        model.train()
        set_checkpointing(model, on)
        packed_logps(model, batch, attention=attention).seq_logps.sum().backward()
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    return step
