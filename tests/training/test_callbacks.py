"""Tests of scrimp/training/callbacks.py: atomic checkpoints, state digests, memory by category."""

from __future__ import annotations

import os

import pytest
import torch

from scrimp.training.callbacks import AtomicCheckpointIO, peak_rss_bytes, state_digest, tensor_bytes


def test_atomic_checkpoint_keeps_the_old_file_when_a_write_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(4)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(4))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"w": torch.zeros(4), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(4))  # previous checkpoint intact
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_state_digest_sees_any_change_in_optimizer_state():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3, 3)
    opt.step()
    before = state_digest(opt)
    assert state_digest(opt) == before
    opt.state[p]["exp_avg"][0, 0] += 1e-7
    assert state_digest(opt) != before


def test_memory_helpers_count_bytes():
    tensors = [torch.zeros(10, dtype=torch.float32), torch.zeros(3, dtype=torch.bfloat16), None]
    assert tensor_bytes(tensors) == 10 * 4 + 3 * 2
    assert peak_rss_bytes() > 10 * 2**20  # a Python process with torch loaded holds more than 10 MiB
