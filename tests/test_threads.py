"""One thread budget for stages, Ray Train workers and the CTranslate2 decoder (pipeline/threads.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.threads import engine_threads, set_torch_threads, thread_cap, threads_for


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cap_limits_a_stage_given_more_cpus(monkeypatch, restore_torch_threads):
    monkeypatch.delenv("HEEDFUL_NUM_THREADS", raising=False)
    assert thread_cap() is None and threads_for(2) == 2 and threads_for(0.5) == 1
    monkeypatch.setenv("HEEDFUL_NUM_THREADS", "1")
    assert threads_for(2) == 1 and threads_for(float("1")) == 1
    assert set_torch_threads(2) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("HEEDFUL_NUM_THREADS", "4")
    assert threads_for(2) == 2  # a cap, never more than the CPUs given


def test_decoder_follows_the_stage_threads_unless_capped(monkeypatch, restore_torch_threads):
    monkeypatch.delenv("HEEDFUL_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert engine_threads() == 1
    torch.set_num_threads(2)
    assert engine_threads() == 2
    monkeypatch.setenv("HEEDFUL_NUM_THREADS", "1")
    assert engine_threads() == 1


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_a_bad_cap_is_an_error_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv("HEEDFUL_NUM_THREADS", bad)
    with pytest.raises(ValueError, match="HEEDFUL_NUM_THREADS"):
        threads_for(2)


def test_a_stage_runs_on_the_capped_threads(monkeypatch, restore_torch_threads, tmp_path):
    """The executor applies the cap to a stage asking for every CPU (what the training and
    evaluation stages do): the thread count seen inside the stage is the cap."""
    from pipeline.executor import _set_threads

    monkeypatch.setenv("HEEDFUL_NUM_THREADS", "1")
    _set_threads(2)
    assert torch.get_num_threads() == 1
    monkeypatch.delenv("HEEDFUL_NUM_THREADS")
    _set_threads(2)
    assert torch.get_num_threads() == 2
