"""Training-step benchmark: tokens/s and memory by category, and the Lightning module's overhead.

    flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/train_step.py            # full table
    flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/train_step.py --quick    # llama_tiny only

For llama_tiny and llama_60m on the CPU, with adamw, galore and frugal (scrimp.optim.build with the
conf/optim defaults, GaLore/FRUGAL at rank = hidden/4 as in the GaLore paper), it measures side by side
in one process:
- a bare PyTorch loop (forward, backward, clip 1.0, optimizer step, LR schedule, zero_grad) and the
  same work through ``lightning.Trainer`` + ``CausalLMModule`` (with the run's
  ``ThroughputMemoryCallback`` and ``log_every_n_steps=10``) on the same model init, batches and
  optimizer; tokens/s of each from the median step time (first step of each run excluded) over
  ``ROUNDS`` alternating rounds, and the ratio;
- memory by category after a step: parameters, gradients, optimizer state
  (``scrimp.optim.memory.state_bytes``) and the peak tensor bytes of the first step: params plus the
  peak allocated during it (``scrimp.profiling.track_live_bytes``).
Prints a markdown table. Data: the stdlib corpus slice (200 files), byte-level BPE with 4096 tokens
(so llama_60m's embeddings are 4096 x 512 here, not the paper's 32000 x 512).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
import warnings

import lightning as L
import torch

from scrimp.optim import build
from scrimp.optim.memory import state_bytes
from scrimp.profiling import track_live_bytes
from scrimp.training.callbacks import ThroughputMemoryCallback
from scrimp.training.data import BlockStreamLoader, TextDataModule
from scrimp.training.models import LLAMA_SIZES, build_model
from scrimp.training.module import CausalLMModule
from scrimp.training.schedule import WarmupCosineScheduler

OPTIMIZERS = {
    "adamw": lambda hidden: {"name": "adamw", "lr": 1e-3},
    "galore": lambda hidden: {"name": "galore", "lr": 1e-2, "rank": hidden // 4, "update_proj_gap": 200,
                              "scale": 0.25},
    "frugal": lambda hidden: {"name": "frugal", "lr": 1e-3, "density": 0.25, "update_gap": 200},
}
ROUNDS = 3
LOG_EVERY_N_STEPS = 10  # conf/trainer/cpu.yaml
SETTINGS = {  # model -> (block_size, batch_size, timed steps)
    "llama_tiny": (128, 8, 30),
    "llama_60m": (128, 4, 5),
}


def bare_loop(model, optimizer, loader, steps: int) -> list[float]:
    """Seconds of each step of a plain PyTorch loop doing the module's work; the first step is dropped."""
    scheduler = WarmupCosineScheduler(optimizer, 0, steps + 1, 0.1)
    times = []
    for batch in loader:
        start = time.perf_counter()
        ids = batch["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


class _StepTimer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


class _FixedData(L.LightningDataModule):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        return self.loader


def lightning_loop(module, loader, steps: int) -> list[float]:
    """Seconds of each of the same steps through ``lightning.Trainer``; the first step is dropped."""
    timer = _StepTimer()
    # What a real run carries per step: the throughput/memory callback and conf/trainer/cpu.yaml's
    # log_every_n_steps (metrics are still computed, the loggers get them every 10 steps).
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + 1, logger=False,
                        callbacks=[ThroughputMemoryCallback(), timer], log_every_n_steps=LOG_EVERY_N_STEPS,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_FixedData(loader))
    return timer.times[1:]


def memory_by_category(model, optimizer, batch) -> dict[str, int]:
    """Params, grads and optimizer state after the first step; the step's peak = params + the peak of
    bytes allocated during it (grads, activations, optimizer state, temporaries), so tensors left
    alive by earlier cases in this process do not count."""
    gc.collect()
    with track_live_bytes(include_baseline=False) as report:
        ids = batch["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "params": params,
        "grads": grads,
        "optimizer_state": state_bytes(optimizer)["total"],
        "peak_live": params + report.peak_delta_bytes,
    }


def run_case(model_name: str, optim_name: str, blocks, vocab: int) -> dict:
    block, batch, steps = SETTINGS[model_name]
    hidden = LLAMA_SIZES[model_name].hidden_size
    optim_cfg = OPTIMIZERS[optim_name](hidden)

    def loader():
        return BlockStreamLoader(blocks[:, :block], batch, steps + 1, seed=0)

    model = build_model(model_name, vocab_size=vocab, seed=0)
    memory = memory_by_category(model, build(optim_cfg, model), next(iter(loader())))
    del model
    # Rounds alternate Lightning and bare on fresh models; each side's throughput is taken from its
    # median step time over all rounds, so bursts of load from other processes on the shared machine
    # (which hit single steps) do not decide the ratio.
    lightning_runs, bare_runs = [], []
    for _ in range(ROUNDS):
        module = CausalLMModule(model_name, optim=optim_cfg, vocab_size=vocab, seed=0, warmup_steps=0,
                                min_lr_ratio=0.1, total_steps=steps + 1, grad_clip=1.0)
        module.build_optimizer()
        lightning_runs.append(lightning_loop(module, loader(), steps))
        model = build_model(model_name, vocab_size=vocab, seed=0)
        bare_runs.append(bare_loop(model, build(optim_cfg, model), loader(), steps))
    tokens = batch * block
    lightning_tps = tokens / statistics.median(t for run in lightning_runs for t in run)
    bare_tps = tokens / statistics.median(t for run in bare_runs for t in run)
    return {"model": model_name, "optim": optim_name, "bare": bare_tps, "lightning": lightning_tps,
            "overhead": bare_tps / lightning_tps - 1.0, **memory}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    """Run every case and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama_tiny only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dm = TextDataModule(source="stdlib", max_documents=200, vocab_size=4096, block_size=128, batch_size=8)
    dm.prepare()
    blocks = dm.train_blocks
    models = ["llama_tiny"] if args.quick else ["llama_tiny", "llama_60m"]
    rows = []
    for model_name in models:
        for optim_name in OPTIMIZERS:
            row = run_case(model_name, optim_name, blocks, dm.tokenizer.vocab_size)
            rows.append(row)
            print(f"done {model_name} {optim_name}: {row['bare']:.0f} vs {row['lightning']:.0f} tokens/s", flush=True)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokens/s over the timed steps "
          "from the median step time (first step excluded); memory in MiB")
    print()
    print("| model | optimizer | bare loop tokens/s | Lightning tokens/s | Lightning overhead | params | grads "
          "| optimizer state | peak, first step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['optim']} | {r['bare']:.0f} | {r['lightning']:.0f} | {100 * r['overhead']:+.1f}% "
              f"| {mib(r['params'])} | {mib(r['grads'])} | {mib(r['optimizer_state'])} | {mib(r['peak_live'])} |")
    worst = max(r["overhead"] for r in rows)
    print()
    print(f"largest Lightning overhead: {100 * worst:+.1f}% (target <= +5%)"
          + ("" if math.isfinite(worst) else " (not measured)"))


if __name__ == "__main__":
    main()
