# python benchmarks/zo_stream_gpu.py                 (the real run: needs CUDA; OPT-1.3B shape, fp16, ~5 min)
# python benchmarks/zo_stream_gpu.py --tiny          (smoke check on any machine, CPU included: tiny OPT)
"""Streamed (ZO2-style) vs non-streamed zeroth-order steps for an OPT-1.3B-shaped model.

Builds ``transformers.OPTForCausalLM`` from an ``OPTConfig`` with the OPT-1.3B shape (hidden 2048,
24 layers, FFN 8192, 32 heads, vocab 50272) and random weights: no download. Runs ZO-SGD steps
(MeZO) with the whole model on the device, then with ``scrimp.optim.offload.stream.ParameterStreamer``
(ZO2, Wang et al. 2025: blocks in pinned CPU memory or on disk, one upload per block per step,
upload of block i+1 overlapped with block i on a side CUDA stream). Prints a markdown table:
device peak memory against the target "2 blocks + embeddings + activations" and step time against
the target "at most 1.3x the non-streamed step", plus whether the two runs' losses agree.

Activations are measured, not guessed: the non-streamed peak minus all parameter bytes is the
activation memory of one forward; the streamed dual forward runs the +eps and -eps copies of the
batch together, so its activation budget is twice that.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from scrimp.optim.offload.stream import ParameterStreamer, causal_lm_loss
from scrimp.optim.zeroth_order import ZOSGD

OPT_1_3B = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2048)
OPT_TINY = dict(hidden_size=128, ffn_dim=512, num_hidden_layers=4, num_attention_heads=4, vocab_size=2048,
                max_position_embeddings=256, word_embed_proj_dim=128)


def build_opt(shape: dict, dtype: torch.dtype):
    """A randomly initialized OPTForCausalLM of the given shape, in eval mode (no dropout: f+ and f- must
    see the same network)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(**shape, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return OPTForCausalLM(config).to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a (CPU)"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = OPT_TINY if args.tiny else OPT_1_3B
    host_model = build_opt(shape, dtype)
    vocab = host_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]

    # ---- non-streamed: everything on the device --------------------------------------------------
    plain = copy.deepcopy(host_model).to(device)
    opt = ZOSGD(plain.parameters(), lr=1e-6, eps=1e-3, seed=0)
    plain_losses, plain_times = [], []
    _reset_peak(device)
    for i, x in enumerate(batches):
        x = x.to(device)
        _sync(device)
        start = time.perf_counter()
        plain_losses.append(float(opt.step(lambda x=x, m=plain: causal_lm_loss(m(x).logits, x))))
        _sync(device)
        if i:  # the first step warms up kernels and the allocator
            plain_times.append(time.perf_counter() - start)
    plain_peak = _peak(device)
    param_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    del plain, opt
    _reset_peak(device)

    # ---- streamed: blocks in the home tier, one at a time on the device ----------------------------
    streamed = host_model
    stream_opt = ZOSGD(streamed.parameters(), lr=1e-6, eps=1e-3, seed=0)
    streamer = ParameterStreamer(streamed, stream_opt, storage=args.storage, device=device)
    block_bytes = max(sum(p.numel() * p.element_size() for p in tier.params) for tier in streamer.tiers)
    non_block_bytes = sum(p.numel() * p.element_size() for p in streamer._non_block_params())
    _reset_peak(device)
    stream_losses, stream_times = [], []
    for i, x in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        stream_losses.append(float(streamer.step(x)))
        _sync(device)
        if i:
            stream_times.append(time.perf_counter() - start)
    streamer.flush()
    stream_peak = _peak(device)

    plain_step, stream_step = statistics.median(plain_times), statistics.median(stream_times)
    activations = None if plain_peak is None else max(plain_peak - param_bytes, 0)
    target = None if activations is None else 2 * block_bytes + non_block_bytes + 2 * activations
    max_loss_gap = max(abs(a - b) for a, b in zip(plain_losses, stream_losses))
    rows = [
        ("model", f"OPT {'tiny' if args.tiny else '1.3B'} shape, {args.dtype}, batch {args.batch}x{args.seq}"),
        ("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke check)"),
        ("storage tier", args.storage),
        ("parameter bytes", _gib(param_bytes)),
        ("largest block / non-block params", f"{_gib(block_bytes)} / {_gib(non_block_bytes)}"),
        ("non-streamed device peak", _gib(plain_peak)),
        ("streamed device peak", _gib(stream_peak)),
        ("target: 2 blocks + non-block + 2x activations", _gib(target)),
        ("streamed peak within target", "n/a" if target is None else str(stream_peak <= target)),
        ("non-streamed step (ms, median)", f"{1e3 * plain_step:.1f}"),
        ("streamed step (ms, median)", f"{1e3 * stream_step:.1f}"),
        ("streamed / non-streamed time (target <= 1.3)", f"{stream_step / plain_step:.2f}"),
        ("uploads per step per block", f"{streamer.uploads / ((args.steps + 2) * len(streamer.tiers)):.2f}"),
        ("max abs(loss streamed - loss non-streamed) over steps", f"{max_loss_gap:.3g}"),
    ]
    print("| quantity | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


def main() -> None:
    """Parse arguments; refuse the full-size run without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny OPT shape: a smoke check that runs on the CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--storage", choices=["cpu", "disk"], default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/zo_stream_gpu.py: the OPT-1.3B run needs a CUDA GPU and none is available here; "
                 "run with --tiny for a CPU smoke check")
    if args.dtype is None:
        args.dtype = "fp16" if torch.cuda.is_available() else "fp32"
    if args.tiny:
        args.seq = min(args.seq, 64)
        args.batch = min(args.batch, 2)
    run(args)


if __name__ == "__main__":
    main()
