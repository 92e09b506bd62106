"""The probes' load guard (pipeline/host_load.py): the machine's load over a block by hand from
/proc/stat-shaped files; an answer measured while the machine was busy is cached as provisional,
kept while it stays busy, measured again by a later process that finds it idle, and never flips
inside the process that measured it."""

from __future__ import annotations

import json
import time

import pytest


def stat_line(busy: int, idle: int, steal: int = 0) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {busy - 10} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def test_load_over_a_block_by_hand(tmp_path):
    """Others' share: busy ticks less this process's own over all ticks; steal over all ticks."""
    from pipeline import host_load

    stat = tmp_path / "stat"
    stat.write_text(stat_line(busy=1000, idle=5000))
    with host_load.watch(str(stat)) as seen:
        stat.write_text(stat_line(busy=1060, idle=5030, steal=10))  # 100 ticks: 60 busy, 30 idle, 10 stolen
    assert seen.load is not None
    assert seen.load.others == pytest.approx(0.6, abs=0.02)  # this process's own CPU in the block: ~0 ticks
    assert seen.load.steal == pytest.approx(0.1) and seen.load.contended
    stat.write_text(stat_line(busy=1000, idle=5000))
    with host_load.watch(str(stat)) as quiet:
        stat.write_text(stat_line(busy=1010, idle=5090))
    assert quiet.load.others == pytest.approx(0.1, abs=0.02) and not quiet.load.contended
    assert host_load.cpu_ticks(str(tmp_path / "missing")) is None
    with host_load.watch(str(tmp_path / "missing")) as unknown:
        pass
    assert unknown.load is None  # nothing known: the probes treat it as idle


def test_this_machines_proc_stat_is_read():
    from pipeline import host_load

    busy, steal, total = host_load.cpu_ticks()
    assert 0 <= busy <= total and 0 <= steal <= total
    assert host_load.sample(0.05) is not None


class Machine:
    """/proc/stat as the guard reads it, busy (80% of every span used by others) or idle."""

    def __init__(self):
        self.busy, self.ticks, self.counted = True, 0, 0

    def __call__(self, stat="/proc/stat"):
        self.ticks += 100
        self.counted += 80 if self.busy else 0
        return self.counted, 0, self.ticks


@pytest.fixture
def machine(monkeypatch):
    from pipeline import host_load
    from trainers import grad_ckpt_probe

    fake = Machine()
    monkeypatch.setattr(host_load, "cpu_ticks", fake)
    monkeypatch.setattr(grad_ckpt_probe, "_answers", {})  # a fresh process
    return fake


def new_process(monkeypatch):
    from trainers import grad_ckpt_probe

    monkeypatch.setattr(grad_ckpt_probe, "_answers", {})


def timed(seconds: dict):
    """A probe measurement that takes no time, watched like the real one (the fake machine's load)."""
    from pipeline import host_load

    with host_load.watch() as seen:
        pass
    return {**seconds, "load": seen.load}


def test_an_engine_answer_measured_busy_is_provisional_until_an_idle_process_measures(tmp_path, monkeypatch, machine):
    from pipeline import engine_probe

    timings = iter([{"hf": 1.0, "ct2": 2.0}, {"hf": 1.0, "ct2": 0.5}])  # busy: HF looked faster; idle: CTranslate2 is
    monkeypatch.setattr(engine_probe, "_measure", lambda model, **_: timed(next(timings)))
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    cache = tmp_path / "engine_probe.json"
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"
    (entry,) = json.loads(cache.read_text()).values()
    assert 0.25 < entry["contended"]["others"] <= 0.8 and entry["contended"]["steal"] == 0.0
    assert "load" not in entry["seconds"]
    machine.busy = False
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # the process that measured keeps it
    new_process(monkeypatch)
    machine.busy = True
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # still busy: no better to measure
    new_process(monkeypatch)
    machine.busy = False
    assert engine_probe.known_cpu_engine("model-a", cache_path=cache) == "hf"  # reading known answers measures nothing
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # ... and that process keeps what it read
    new_process(monkeypatch)
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2"  # idle: measured again
    (entry,) = json.loads(cache.read_text()).values()
    assert "contended" not in entry and entry["ct2_vs_hf"] == 2.0
    new_process(monkeypatch)
    machine.busy = True
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2"  # an idle answer is kept (timings spent)


def test_checkpointing_and_precision_answers_measured_busy_are_provisional(tmp_path, monkeypatch, machine):
    import time

    from pipeline import precision
    from trainers.grad_ckpt_probe import choose_gradient_checkpointing

    steps = {False: 0, True: 0}

    def step(on):  # measure() times 3 calls a setting: "on" is slower the first time, "off" the second
        steps[on] += 1
        time.sleep(0.004 if on == (steps[on] <= 3) else 0.0)

    cache = tmp_path / "grad_ckpt_probe.json"
    assert choose_gradient_checkpointing("m", "cpu|rows=4", step, cache_path=cache) is False
    (entry,) = json.loads(cache.read_text()).values()
    assert 0.25 < entry["contended"]["others"] <= 0.8
    new_process(monkeypatch)
    machine.busy = False
    assert choose_gradient_checkpointing("m", "cpu|rows=4", step, cache_path=cache, run_steps=2) is False  # too short: as is
    assert steps == {False: 3, True: 3}
    assert choose_gradient_checkpointing("m", "cpu|rows=4", step, cache_path=cache) is False  # what this process read
    new_process(monkeypatch)
    assert choose_gradient_checkpointing("m", "cpu|rows=4", step, cache_path=cache) is True  # idle: measured again
    assert steps == {False: 6, True: 6}
    (entry,) = json.loads(cache.read_text()).values()
    assert "contended" not in entry

    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "has_bf16_units", lambda: True)
    timings = iter([{"float32": 1.0, "bfloat16": 2.0}, {"float32": 1.0, "bfloat16": 0.5}])
    monkeypatch.setattr(precision, "_measure", lambda: next(timings))
    cache = tmp_path / "precision_probe.json"
    machine.busy = True
    new_process(monkeypatch)
    assert precision.cpu_precision(cache_path=cache) == "float32"
    assert precision.known_cpu_precision(cache_path=cache) == "float32"  # reading the known answer measures nothing
    new_process(monkeypatch)
    machine.busy = False
    assert precision.cpu_precision(cache_path=cache) == "bfloat16"


def test_a_process_keeps_the_answer_it_used_and_a_busy_answer_never_replaces_an_idle_one(tmp_path, monkeypatch, machine):
    """Another process re-measuring (the file rewritten) does not flip this process's answer; a
    measurement stamped busy is not written over an idle entry another process wrote meanwhile."""
    from pipeline import engine_probe
    from trainers.grad_ckpt_probe import store

    monkeypatch.delenv(engine_probe.ENV, raising=False)
    monkeypatch.setattr(engine_probe, "_measure", lambda model, **_: timed({"hf": 1.0, "ct2": 2.0}))
    cache = tmp_path / "engine_probe.json"
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # busy, provisional
    (key,) = json.loads(cache.read_text())
    data = json.loads(cache.read_text())
    data[key] = {**data[key], "engine": "ct2"}
    data[key].pop("contended")
    cache.write_text(json.dumps(data))  # another process measured it again, idle
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # this one keeps what it used
    assert engine_probe.known_cpu_engine("model-a", cache_path=cache) == "hf"
    new_process(monkeypatch)
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2"  # a new process reads the file

    store(cache, key, {"engine": "hf", "contended": {"others": 0.9, "steal": 0.0}})
    assert json.loads(cache.read_text())[key]["engine"] == "ct2"  # the idle entry stays
    store(cache, "other", {"engine": "hf", "contended": {"others": 0.9, "steal": 0.0}})
    assert json.loads(cache.read_text())["other"]["engine"] == "hf"  # nothing there: the provisional one is written


def test_a_span_too_short_to_tell_is_watched_on_then_given_up(tmp_path):
    """Fewer than MIN_TICKS ticks: watched on for up to TAIL_SECONDS; a /proc/stat that never moves
    (nothing to tell) gives no load rather than a made-up one."""
    from pipeline import host_load

    stat = tmp_path / "stat"
    stat.write_text(stat_line(busy=1000, idle=5000))
    start = time.monotonic()
    with host_load.watch(str(stat)) as frozen:
        pass
    assert frozen.load is None and host_load.TAIL_SECONDS <= time.monotonic() - start < host_load.TAIL_SECONDS + 0.5


def test_a_server_measuring_a_lone_request_keeps_the_stages_answer(tmp_path, monkeypatch, machine):
    """An idle entry from before lone requests were timed: the server measures (busy), adds the lone
    request's answer, keeps the batch answer the stages used, and the entry is written (the next
    server does not measure again while the machine stays busy)."""
    from pipeline import engine_probe

    monkeypatch.delenv(engine_probe.ENV, raising=False)
    measured = []
    monkeypatch.setattr(
        engine_probe,
        "_measure",
        lambda model, batch=True, lone=True: (
            measured.append(model)
            or timed({**({"hf": 1.0, "ct2": 2.0} if batch else {}), **({"hf_single": 2.0, "ct2_single": 1.0} if lone else {})})
        ),
    )
    cache = tmp_path / "engine_probe.json"
    key = engine_probe._key("model-a", "float32")
    monkeypatch.setattr("pipeline.precision.cpu_precision", lambda: "float32")
    monkeypatch.setattr("pipeline.precision.known_cpu_precision", lambda: "float32")
    cache.write_text(json.dumps({key: {"engine": "ct2", "ct2_vs_hf": 1.5, "seconds": {"hf": 1.5, "ct2": 1.0}}}))
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2" and measured == []
    assert engine_probe.serving_cpu_engine("model-a", cache_path=cache) == "ct2"  # the batch answer kept
    entry = json.loads(cache.read_text())[key]
    assert (entry["engine"], entry["single"], entry["seconds"]["hf"]) == ("ct2", "ct2", 1.5) and "contended" in entry
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2"  # this process: one answer
    new_process(monkeypatch)
    assert engine_probe.serving_cpu_engine("model-a", cache_path=cache) == "ct2" and measured == ["model-a"]
