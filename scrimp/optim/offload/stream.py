"""ZO2-style parameter streaming for zeroth-order fine-tuning of models larger than the device.

Follows ZO2 (Wang et al., "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language
Models with Limited GPU Memory", 2025, liangyuwang/zo2), generalized:

- the transformer blocks live in a home tier: pinned CPU memory (``storage="cpu"``) or
  memory-mapped files on disk (``storage="disk"``, ``torch.from_file(shared=True)``, written back
  in place); embeddings, final norm and head stay on the device;
- blocks pass through the device one at a time, moved by module hooks on the blocks
  (``model.model.layers`` and the other usual places, or a user-given list): no per-architecture
  forward code, unlike ZO2's hand-written OPT forward;
- the dual forward: the batch is replicated, and every parameter-owning leaf module runs the +eps
  half and the -eps half (and further queries) with their own perturbed weights while its block is
  resident (``scrimp.optim.zo.perturbation.sliced_perturbation``);
- ZO2's fused update: the previous step's update (a plan of (seed, weight) terms) is applied to a
  block when it arrives, so each block is uploaded once and written back once per step;
- on CUDA, block i+1 is uploaded on a side stream while block i computes; on the CPU the same code
  runs synchronously, so bitwise parity with the non-streamed optimizer is testable anywhere.

    from scrimp.optim.offload.stream import ParameterStreamer
    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    streamer = ParameterStreamer(model, opt, storage="cpu", device="cuda")
    loss = streamer.step(input_ids)          # one ZO step: one upload per block
    streamer.flush()                         # apply the last pending update before saving
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scrimp.optim.zo.optimizer import ZerothOrderOptimizer, projected_gradient
from scrimp.optim.zo.perturbation import param_leaf_modules, sliced_perturbation
from scrimp.optim.zo.rules import Plan, SGDRule

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
STORAGES = ("cpu", "disk")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy (labels shifted by one), as transformers' causal LM loss.

    Half-precision logits are upcast to fp32; fp32/fp64 logits keep their precision.
    """
    shifted_logits = logits[:, :-1, :]
    if shifted_logits.dtype not in (torch.float32, torch.float64):
        shifted_logits = shifted_logits.float()
    shifted_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=ignore_index
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers decoder model (first match in BLOCK_PATHS)."""
    for path in BLOCK_PATHS:
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    raise ValueError(
        f"could not find the transformer blocks of {type(model).__name__} at any of {', '.join(BLOCK_PATHS)}; "
        "pass blocks=[...] (the list of block modules) to stream it"
    )


def active_dropout(model: nn.Module) -> bool:
    """Whether a forward of ``model`` would drop units: dropout modules, or a transformers config's
    ``*dropout`` rates (OPT calls ``F.dropout`` with config rates, no modules), in training mode."""
    if not model.training:
        return False
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = [getattr(config, k) for k in dir(config) if k.endswith("dropout") and not k.startswith("_")] if config else []
    return any(isinstance(r, (int, float)) and r > 0 for r in rates)


def check_input_ids(model: nn.Module, input_ids) -> None:
    """Refuse in one sentence, before any block moves, a batch that is not 2-D integer token ids with
    at least 2 tokens per row, or that holds ids outside the model's input embedding."""
    integer = isinstance(input_ids, torch.Tensor) and not input_ids.is_floating_point() \
        and not input_ids.is_complex() and input_ids.dtype != torch.bool
    if not integer or input_ids.dim() != 2 or input_ids.shape[1] < 2 or input_ids.shape[0] < 1:
        shown = f"{input_ids.dtype} of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D integer tensor (batch, sequence) with at least 2 tokens per "
                         f"row (the loss predicts the next token), got {shown}")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the rows of the input embedding), got values in "
                             f"[{low}, {high}]")


class _BlockTier:
    """One block's parameters in its home tier, one flat buffer per dtype, and the device copy."""

    def __init__(self, params: list[nn.Parameter], storage: str, path: Path | None, pin: bool):
        self.params = params
        self.by_dtype: dict[torch.dtype, list[int]] = {}
        for position, param in enumerate(params):
            self.by_dtype.setdefault(param.dtype, []).append(position)
        self.home: dict[torch.dtype, torch.Tensor] = {}
        # Copies first: a parameter may already live in the very file about to be truncated (a second
        # streamer over the same directory), which would otherwise read back zeros.
        sources = [param.detach().cpu().clone() for param in params]
        for dtype, positions in self.by_dtype.items():
            numel = sum(params[k].numel() for k in positions)
            if storage == "disk":
                file = path.with_suffix(f".{str(dtype).split('.')[-1]}.bin")
                with open(file, "wb") as handle:
                    handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
                flat = torch.from_file(str(file), shared=True, size=numel, dtype=dtype)
            else:
                flat = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self.home[dtype] = flat
        with torch.no_grad():
            for view, param, source in zip(self._views(self.home), params, sources):
                view.copy_(source)
                param.data = view
        self.resident: dict[torch.dtype, torch.Tensor] | None = None
        self.ready: torch.cuda.Event | None = None

    def _views(self, flats: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        views: list[torch.Tensor | None] = [None] * len(self.params)
        for dtype, positions in self.by_dtype.items():
            offset = 0
            for k in positions:
                numel = self.params[k].numel()
                views[k] = flats[dtype][offset : offset + numel].view(self.params[k].shape)
                offset += numel
        return views

    def point_params_at(self, flats: dict[torch.dtype, torch.Tensor]) -> None:
        for view, param in zip(self._views(flats), self.params):
            param.data = view


class ParameterStreamer:
    """Runs ZO steps of ``optimizer`` on ``model`` with the blocks streamed through ``device``.

    ``optimizer`` must be a ``ZOSGD`` (no full-size state: ZO-Adam's moments would have to stream
    too) over parameters of ``model``. ``storage`` is the blocks' home tier: ``"cpu"`` (pinned when
    CUDA is available) or ``"disk"`` (files under ``directory``, a temporary one by default).
    ``loss_fn(logits, labels)`` must reduce to a scalar per replicated slice; the default is the
    mean causal-LM cross-entropy ``causal_lm_loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: ZerothOrderOptimizer,
        blocks: Sequence[nn.Module] | None = None,
        storage: str = "cpu",
        device: str | torch.device | None = None,
        directory: str | Path | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss,
    ):
        if not isinstance(optimizer, ZerothOrderOptimizer) or not isinstance(optimizer.rule, SGDRule):
            raise ValueError(f"ParameterStreamer needs a ZOSGD optimizer (stateless), got {type(optimizer).__name__}; "
                             "ZOAdam's moments and first-order optimizers do not stream")
        if optimizer.perturbation != "hook":
            raise ValueError("ParameterStreamer needs perturbation='hook' (it never writes perturbed weights)")
        if optimizer.query_allocator is not None:
            raise ValueError("ParameterStreamer does not support query_allocator; use n_queries")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        self.blocks = list(blocks) if blocks is not None else find_blocks(model)
        if not self.blocks or not all(isinstance(b, nn.Module) for b in self.blocks):
            raise ValueError("blocks must be a non-empty list of nn.Module (the transformer blocks)")
        self.index_of = optimizer.index_of()
        self.group_of = {id(p): g for _, g, p in optimizer.indexed_params()}
        known = {id(p) for p in model.parameters()}
        if any(pid not in known for pid in self.index_of):
            raise ValueError("the optimizer holds parameters that are not parameters of the model")
        self.leaves = param_leaf_modules(list(model.modules()), self.index_of)
        if active_dropout(model):
            warnings.warn(
                "the model is in training mode with dropout: the +eps and -eps copies see different "
                "dropout masks, which swamps the two-point estimate; call model.eval() for ZO training",
                RuntimeWarning,
            )
        self._directory = None
        if storage == "disk":
            if directory is None:
                self._directory = tempfile.TemporaryDirectory(prefix="scrimp-stream-")
                directory = self._directory.name
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.streams_on_device = not (self.device.type == "cpu" and storage == "cpu")
        pin = storage == "cpu" and torch.cuda.is_available()
        block_param_ids = set()
        self.tiers = []
        for i, block in enumerate(self.blocks):
            params = list(dict.fromkeys(block.parameters()))
            block_param_ids.update(id(p) for p in params)
            path = Path(directory) / f"block{i:04d}" if storage == "disk" else None
            self.tiers.append(_BlockTier(params, storage, path, pin))
            for buffer in block.buffers():
                buffer.data = buffer.data.to(self.device)
        # everything that is not a block parameter lives on the device for the whole run
        with torch.no_grad():
            for param in model.parameters():
                if id(param) not in block_param_ids:
                    param.data = param.data.to(self.device)
            for module in model.modules():
                if any(module is b for b in self.blocks):
                    continue
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(self.device)
        self.block_index = {id(b): i for i, b in enumerate(self.blocks)}
        self.pending: Plan | None = None
        self._updated: set[int] = set()
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.uploads = 0

    # ---- tier movement ---------------------------------------------------------------------------
    def _upload(self, i: int) -> None:
        """Start bringing block i to the device (on the copy stream under CUDA)."""
        tier = self.tiers[i]
        if tier.resident is not None or not self.streams_on_device:
            return
        context = torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext()
        with context:
            tier.resident = {
                dtype: torch.empty(flat.shape, dtype=dtype, device=self.device).copy_(flat, non_blocking=True)
                for dtype, flat in tier.home.items()
            }
            if self.cuda:
                tier.ready = torch.cuda.Event()
                tier.ready.record(self.copy_stream)
        self.uploads += 1

    def _make_resident(self, i: int) -> None:
        tier = self.tiers[i]
        if not self.streams_on_device:
            return
        self._upload(i)
        if self.cuda and tier.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(tier.ready)
            for flat in tier.resident.values():
                flat.record_stream(compute)
            tier.ready = None
        tier.point_params_at(tier.resident)

    def _release(self, i: int, write_back: bool) -> None:
        """Write block i back to its home tier if it changed and drop the device copy."""
        tier = self.tiers[i]
        if not self.streams_on_device or tier.resident is None:
            return
        if write_back:
            if self.cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self.copy_stream.wait_event(done)
                with torch.cuda.stream(self.copy_stream):
                    for dtype, flat in tier.resident.items():
                        tier.home[dtype].copy_(flat, non_blocking=True)
                        flat.record_stream(self.copy_stream)
            else:
                for dtype, flat in tier.resident.items():
                    tier.home[dtype].copy_(flat)
        tier.point_params_at(tier.home)
        tier.resident = None

    def _apply_pending(self, params: Sequence[nn.Parameter]) -> None:
        if self.pending is None:
            return
        for param in params:
            index = self.index_of.get(id(param))
            if index is None or index in self._updated:
                continue
            self.optimizer.apply_plan(self.pending, param, index, self.group_of[id(param)])
            self._updated.add(index)

    def _non_block_params(self) -> list[nn.Parameter]:
        in_blocks = {id(p) for tier in self.tiers for p in tier.params}
        return [p for p in self.model.parameters() if id(p) not in in_blocks]

    # ---- hooks -----------------------------------------------------------------------------------
    def _install_block_hooks(self):
        handles = []

        def pre_hook(block, args):
            i = self.block_index[id(block)]
            self._make_resident(i)
            self._apply_pending(self.tiers[i].params)
            if i + 1 < len(self.tiers):
                self._upload(i + 1)  # overlaps with block i's compute under CUDA

        def post_hook(block, args, output):
            i = self.block_index[id(block)]
            self._release(i, write_back=self.pending is not None)

        for block in self.blocks:
            handles.append(block.register_forward_pre_hook(pre_hook))
            handles.append(block.register_forward_hook(post_hook, always_call=True))
        return handles

    def _finish_transfers(self) -> None:
        if self.cuda:
            self.copy_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for i in range(len(self.tiers)):
            self._release(i, write_back=False)  # a prefetched block the forward never reached

    # ---- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None):
        """One streamed ZO step on a batch; returns the mean of the evaluated losses, None if skipped.

        Applies the previous step's update to every block as it passes, then runs all perturbed
        copies (+eps/-eps for each query) of the batch through the model in one pass.
        """
        check_input_ids(self.model, input_ids)
        labels = (input_ids if labels is None else labels).to(self.device)  # a custom loss_fn gets them beside the logits
        opt = self.optimizer
        seeds = opt.query_seeds()
        slices = [(seed, sign * opt.eps) for seed in seeds for sign in (1.0, -1.0)]
        copies = len(slices)
        self._updated = set()
        self._apply_pending(self._non_block_params())
        handles = self._install_block_hooks()
        try:
            try:
                with sliced_perturbation(self.leaves, self.index_of, slices):
                    ids = input_ids.to(self.device).repeat(copies, 1)
                    mask = None if attention_mask is None else attention_mask.to(self.device).repeat(copies, 1)
                    logits = self.model(input_ids=ids, attention_mask=mask).logits
            finally:
                for handle in handles:
                    handle.remove()
                self._finish_transfers()
        except BaseException:
            # The blocks that ran took the previous update and the others did not: finish it, so
            # that the model is exactly at the previous step and this one can be retried.
            self._check_all_updated()
            self.pending = None
            raise
        self._check_all_updated()
        self.pending = None
        losses = [self.loss_fn(chunk, labels) for chunk in logits.chunk(copies, dim=0)]
        del logits
        checked = []
        for loss in losses:  # the first invalid loss skips the step (counted once)
            checked.append(opt.finite_loss(loss))
            if checked[-1] is None:
                opt.finish_step(seeds, apply=False)  # no estimate: the next step draws new seeds
                return None
        opt.add_estimate([projected_gradient(float(checked[2 * j]), float(checked[2 * j + 1]), opt.eps) / len(seeds)
                          for j in range(len(seeds))])
        self.pending = opt.finish_step(seeds, apply=False)
        return torch.stack(checked).mean().to(torch.float32)

    def _check_all_updated(self) -> None:
        if self.pending is None:
            return
        missing = len(self.index_of) - len(self._updated)
        if missing:
            # blocks the forward did not run (e.g. early exit): bring them through now
            self._flush_blocks()

    def _flush_blocks(self) -> None:
        for i, tier in enumerate(self.tiers):
            if all(self.index_of.get(id(p)) in self._updated or id(p) not in self.index_of for p in tier.params):
                continue
            self._make_resident(i)
            self._apply_pending(tier.params)
            self._release(i, write_back=True)
            self._finish_transfers()
        self._apply_pending(self._non_block_params())

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every parameter (before evaluating or saving the model)."""
        if self.pending is None:
            return
        self._updated = set()
        self._flush_blocks()
        self.pending = None
