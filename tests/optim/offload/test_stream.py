"""Tests for scrimp/optim/offload/stream.py: a streamed ZO step equals the non-streamed one, bitwise.

Reference: ``ZOSGD.step`` on the same model with the same seeds (itself tested against float64
references in tests/optim/test_zeroth_order.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from scrimp.optim.offload.stream import ParameterStreamer, causal_lm_loss, find_blocks
from scrimp.optim.zeroth_order import ZOSGD, ZOAdam
from scrimp.training.models import build_model


@pytest.fixture(autouse=True)
def single_thread():
    # small ops: on a shared 2-core machine one thread is several times faster than two (no spin-waits);
    # every comparison here runs both sides under the same thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return build_model("llama_tiny", seed=0)


def _batch(seed: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("storage,kwargs", [("cpu", {}), ("disk", {"n_queries": 2, "weight_decay": 0.1}),
                                            ("cpu", {"momentum": 0.9, "momentum_window": 3, "sign": True})])
def test_streamed_zo_steps_equal_non_streamed_steps_bitwise(tiny, tmp_path, storage, kwargs):
    plain, streamed = copy.deepcopy(tiny), copy.deepcopy(tiny)
    plain_opt = ZOSGD(plain.parameters(), lr=1e-3, eps=1e-3, seed=7, **kwargs)
    stream_opt = ZOSGD(streamed.parameters(), lr=1e-3, eps=1e-3, seed=7, **kwargs)
    streamer = ParameterStreamer(streamed, stream_opt, storage=storage, device="cpu", directory=tmp_path)
    for step in range(3):
        x = _batch(step)
        plain_loss = plain_opt.step(lambda x=x: causal_lm_loss(plain(x).logits, x))
        stream_loss = streamer.step(x)
        assert torch.equal(plain_loss, stream_loss)
    assert streamer.pending is not None  # the last update waits for the blocks' next pass
    streamer.flush()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), streamed.parameters()))
    assert [r["grads"].tolist() for r in plain_opt.log] == [r["grads"].tolist() for r in stream_opt.log]
    if storage == "disk":
        # one upload per block per step (the fused update), plus the flush
        assert streamer.uploads == 3 * len(streamer.blocks) + len(streamer.blocks)
        assert list(tmp_path.glob("block*.bin"))
        block_param = next(streamer.blocks[0].parameters())
        assert block_param.untyped_storage().nbytes() == streamer.tiers[0].home[torch.float32].untyped_storage().nbytes()


def test_streaming_needs_findable_blocks_and_a_stateless_optimizer(tiny):
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    odd = NoBlocks()
    with pytest.raises(ValueError, match="blocks"):
        ParameterStreamer(odd, ZOSGD(odd.parameters()), device="cpu")
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="ZOSGD"):
        ParameterStreamer(model, ZOAdam(model.parameters()), device="cpu")
    with pytest.raises(ValueError, match="storage"):
        ParameterStreamer(model, ZOSGD(model.parameters()), storage="tape", device="cpu")
    assert len(find_blocks(model)) == model.config.num_hidden_layers


def test_user_given_blocks_and_skipped_steps(tiny):
    model = copy.deepcopy(tiny)
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3)
    streamer = ParameterStreamer(model, opt, blocks=list(model.model.layers), device="cpu",
                                 loss_fn=lambda logits, labels: logits.sum() * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert streamer.step(_batch(0)) is None
    assert opt.skipped == 1 and streamer.pending is None
    streamer.flush()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))



def test_a_skipped_streamed_step_moves_on_to_the_seeds_the_plain_optimizer_moves_on_to(tiny):
    # the streamer drives the optimizer through its public seam only; a skip there must book what
    # ZOSGD.step books for a skip (a new draw, no step), so the runs stay bitwise equal afterwards
    plain, streamed = copy.deepcopy(tiny), copy.deepcopy(tiny)
    plain_opt = ZOSGD(plain.parameters(), lr=1e-3, eps=1e-3, seed=3)
    stream_opt = ZOSGD(streamed.parameters(), lr=1e-3, eps=1e-3, seed=3)
    poison = [float("nan")]

    def poisoned(logits, labels):
        return causal_lm_loss(logits, labels) * poison[0]

    streamer = ParameterStreamer(streamed, stream_opt, device="cpu", loss_fn=poisoned)
    for step in range(3):
        x = _batch(step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skip's warning; its count is checked below
            plain_loss = plain_opt.step(lambda x=x: poisoned(plain(x).logits, x))
            stream_loss = streamer.step(x)
        assert (plain_loss is None and stream_loss is None) if step == 0 else torch.equal(plain_loss, stream_loss)
        poison[0] = 1.0
    streamer.flush()
    assert stream_opt.skipped == plain_opt.skipped == 1 and stream_opt.draws == plain_opt.draws == 3
    assert [r["seeds"].tolist() for r in stream_opt.log] == [r["seeds"].tolist() for r in plain_opt.log]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), streamed.parameters()))

def test_streaming_is_generic_over_decoders_opt_blocks_found_and_parity_holds():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    plain = OPTForCausalLM(config).eval()  # eval: dropout would give +eps and -eps different masks
    streamed = copy.deepcopy(plain)
    plain_opt = ZOSGD(plain.parameters(), lr=1e-2, eps=1e-3, seed=1)
    streamer = ParameterStreamer(streamed, ZOSGD(streamed.parameters(), lr=1e-2, eps=1e-3, seed=1), device="cpu")
    assert streamer.blocks == list(streamed.model.decoder.layers)
    for step in range(2):
        x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(step))
        plain_opt.step(lambda x=x: causal_lm_loss(plain(x).logits, x))
        streamer.step(x)
    streamer.flush()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), streamed.parameters()))
    training = copy.deepcopy(plain).train()
    with pytest.warns(RuntimeWarning, match="dropout"):
        ParameterStreamer(training, ZOSGD(training.parameters()), device="cpu")


def test_a_second_disk_streamer_on_the_same_directory_keeps_the_weights(tiny, tmp_path):
    model = copy.deepcopy(tiny).eval()
    first = ParameterStreamer(model, ZOSGD(model.parameters(), lr=1e-3, eps=1e-3), storage="disk", device="cpu",
                              directory=tmp_path)
    first.step(_batch(0))
    first.flush()
    expect = [p.detach().clone() for p in model.parameters()]
    ParameterStreamer(model, ZOSGD(model.parameters(), lr=1e-4, eps=1e-3), storage="disk", device="cpu",
                      directory=tmp_path)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expect))


def test_a_step_that_raises_mid_forward_leaves_the_model_at_the_previous_step(tiny):
    # E.g. an out-of-memory error in block 1: the blocks before it took the previous update on their
    # way through. The streamer must finish that update everywhere, so a retry equals a clean run.
    clean, failing = copy.deepcopy(tiny), copy.deepcopy(tiny)
    clean_streamer = ParameterStreamer(clean, ZOSGD(clean.parameters(), lr=1e-3, eps=1e-3, seed=3), device="cpu")
    streamer = ParameterStreamer(failing, ZOSGD(failing.parameters(), lr=1e-3, eps=1e-3, seed=3), device="cpu")
    for x in (_batch(0), _batch(1)):
        clean_streamer.step(x)
    streamer.step(_batch(0))

    def out_of_memory(module, args):
        raise RuntimeError("CUDA out of memory (simulated)")

    handle = streamer.blocks[1].register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        streamer.step(_batch(1))
    handle.remove()
    assert streamer.pending is None
    streamer.step(_batch(1))  # the retry draws the same seeds: nothing was booked for the failed attempt
    clean_streamer.flush()
    streamer.flush()
    assert all(torch.equal(a, b) for a, b in zip(clean.parameters(), failing.parameters()))


def test_bad_batches_are_one_sentence_before_any_block_moves(tiny):
    model = copy.deepcopy(tiny)
    streamer = ParameterStreamer(model, ZOSGD(model.parameters(), lr=1e-3, eps=1e-3), device="cpu")
    good = _batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    for bad, message in [(good.float(), "2-D integer tensor"), (good[:, :1], "at least 2 tokens"),
                         (good + model.config.vocab_size, "must lie in \\[0, ")]:
        with pytest.raises(ValueError, match=message):
            streamer.step(bad)
    assert streamer.uploads == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
