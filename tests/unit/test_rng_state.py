"""RNG state in training checkpoints: saved per rank, restored per rank, own device only."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.state import (
    TrainState,
    load_train_state,
    rank_rng_state,
    restore_rank_rng,
    save_train_state,
)

CPU = torch.device("cpu")


def draws() -> tuple[list[float], float]:
    return torch.rand(4).tolist(), random.random()


def parts() -> dict[str, Part]:
    module = torch.nn.Linear(3, 2)
    return {"model": Part("model", module, module, OptimConfig())}


def test_each_rank_restores_its_own_rng_state(tmp_path):
    states, expected = [], []
    for rank in range(2):  # what each rank of a 2-rank run holds at the checkpoint
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        draws()  # some training happened before the checkpoint
        states.append(rank_rng_state(CPU))
        expected.append(draws())
    save_train_state(tmp_path, TrainState(step=5), parts(), {}, states)

    for rank in range(2):
        torch.manual_seed(999)  # the restarted rank starts from some other state
        random.seed(999)
        state, _ = load_train_state(tmp_path, parts(), CPU, rank)
        assert state.step == 5
        assert draws() == expected[rank]
    assert expected[0] != expected[1]  # the ranks' random streams stay different


def test_a_rank_the_saving_run_did_not_have_keeps_its_own_seed(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    saved = parts()
    save_train_state(tmp_path, TrainState(), saved, {}, [rank_rng_state(CPU)])
    torch.manual_seed(7)
    random.seed(7)
    before = rank_rng_state(CPU)
    load_train_state(tmp_path, saved, CPU, rank=1)
    after = rank_rng_state(CPU)
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]


def test_cpu_rank_state_has_no_cuda_part():
    assert rank_rng_state(CPU)["cuda"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_touches_only_the_rank_device():
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last device: not the default
    saved = rank_rng_state(device)
    assert torch.equal(saved["cuda"], torch.cuda.get_rng_state(device))
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed_all(11)
    others = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count() - 1)]
    restore_rank_rng(saved, device)
    assert torch.equal(torch.rand(4, device=device), expected)
    assert all(torch.equal(torch.cuda.get_rng_state(d), o) for d, o in enumerate(others))
