"""Fault injection: off unless TOKENMILL_FAULTS is set, fires only where its conditions hold,
once per flag file, and a typo is an error, not a silently healthy run."""

from __future__ import annotations

import pytest

from tokenmill.pipeline.runtime import faults


def test_off_unless_the_variable_is_set(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.hit("train.step", step=7, rank=1)
    assert faults.env_vars() == {}


def test_fires_where_the_conditions_hold_and_once_per_flag(monkeypatch, tmp_path):
    flag = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, f"train.step,step=7,rank=1,once={flag}")
    assert faults.env_vars() == {faults.ENV: f"train.step,step=7,rank=1,once={flag}"}
    faults.hit("train.step", step=7, rank=0)
    faults.hit("train.step", step=6, rank=1)
    faults.hit("tokenize.before_marker", unit=7)
    assert not flag.exists()
    with pytest.raises(faults.InjectedFault, match="train.step"):
        faults.hit("train.step", step=7, rank=1)
    assert flag.exists()
    faults.hit("train.step", step=7, rank=1)  # the retried attempt passes


def test_without_once_it_fires_every_time(monkeypatch):
    monkeypatch.setenv(faults.ENV, "tokenize.before_marker,unit=2")
    for _ in range(2):
        with pytest.raises(faults.InjectedFault):
            faults.hit("tokenize.before_marker", unit=2)


@pytest.mark.parametrize("spec", ["train.stpe,step=1", "train.step,shard=1", "train.step,step", "train.step,action=die",
                                  "train.step,action=wait", "train.step,until=/tmp/x"])
def test_a_bad_spec_is_an_error(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    with pytest.raises(ValueError, match=faults.ENV):
        faults.hit("train.step", step=1, rank=0)


def test_wait_holds_the_process_until_the_flag_exists(monkeypatch, tmp_path):
    import os
    import threading
    import time

    go = tmp_path / "go"
    monkeypatch.setenv(faults.ENV, f"tokenize.before_marker,unit=1,action=wait,until={go}")
    monkeypatch.setenv(faults.STORAGE_ENV, f"rate=0.02,dir={tmp_path}")
    assert set(faults.env_vars()) == {faults.ENV, faults.STORAGE_ENV}  # both reach Ray workers
    waiter = threading.Thread(target=faults.hit, args=("tokenize.before_marker",), kwargs={"unit": 1})
    waiter.start()
    deadline = time.time() + 10
    while not (tmp_path / f"go.waiting-{os.getpid()}").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / f"go.waiting-{os.getpid()}").exists() and waiter.is_alive()
    go.touch()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    faults.hit("tokenize.before_marker", unit=1)  # the flag exists: passes at once
