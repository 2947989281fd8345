"""``CausalLMModule``: a LightningModule for causal-LM pre-training with memory-efficient optimizers.

Follows the GaLore paper's pre-training recipe (Zhao et al., 2024: LLaMA sizes, cosine schedule
with linear warmup and a minimum LR ratio) on transformers' ``LlamaForCausalLM``; the optimizer
comes from ``scrimp.optim.build(cfg.optim, model)``. The optimization mode is read from the
optimizer, so the user never chooses it:

- first-order optimizers (AdamW, GaLore, FRUGAL, 8-bit): Lightning's automatic optimization;
- ``optimizer.is_zeroth_order``: ``opt.step(closure)``, the closure runs forwards only
  (MeZO, Malladi et al., 2023);
- ``optimizer.is_layerwise``: ``manual_backward`` (updates run in backward hooks), then
  ``opt.step()`` and ``opt.zero_grad()`` (GaLore's per-layer weight update, Sec. 4.3).

    from scrimp.training.module import CausalLMModule
    module = CausalLMModule("llama_tiny", optim={"name": "galore", "lr": 1e-2, "rank": 16}, vocab_size=4096)
    lightning.Trainer(max_steps=50).fit(module, datamodule)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch

from scrimp.optim.finite_guard import all_finite_exact
from scrimp.training.callbacks import is_logging_step
from scrimp.training.models import build_model
from scrimp.training.schedule import WarmupCosineScheduler, check_schedule


def _plain(cfg) -> dict:
    """A plain dict from a dict or an OmegaConf node (the optimizer factory takes keyword arguments)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    return dict(cfg)


def optimization_mode(optimizer) -> str:
    """``"automatic"``, ``"zeroth_order"``, ``"layerwise"`` or ``"manual"``, from the optimizer's flags."""
    if not getattr(optimizer, "needs_manual_optimization", False):
        return "automatic"
    if getattr(optimizer, "is_zeroth_order", False):
        return "zeroth_order"
    if getattr(optimizer, "is_layerwise", False):
        return "layerwise"
    return "manual"


def check_layerwise_world_size(mode: str, world_size: int) -> None:
    """Refuse layer-wise updates on several processes: each layer steps inside backward, on its rank's
    own gradient, before DDP has averaged it, so the ranks' weights would drift apart."""
    if mode == "layerwise" and world_size > 1:
        raise ValueError(
            f"optim.layerwise=true cannot run on {world_size} processes: each layer is updated inside "
            "backward, before DDP has averaged its gradient, so the ranks' weights would drift apart; "
            "use one process or optim.layerwise=false"
        )


class CausalLMModule(L.LightningModule):
    """LLaMA causal-LM training with the optimizer built by ``scrimp.optim.build``.

    Args:
        model: a named size (``llama_tiny``, ``llama_60m`` ... ``llama_1b``) or a path/hub name
            for ``from_pretrained``.
        optim: the optimizer config (``name`` plus its keyword arguments), see ``scrimp.optim.build``.
        vocab_size: vocabulary of a named size (follows the tokenizer); ignored for pretrained.
        seed: weight-initialisation seed of a named size.
        warmup_steps, min_lr_ratio, total_steps: the cosine schedule (``total_steps=None``: the
            trainer's estimated optimizer steps).
        grad_clip: global gradient-norm clipping (None or 0: off). Zeroth-order optimizers have no
            gradient to clip; layer-wise updates cannot be clipped globally (raises).
        model_overrides: extra ``LlamaConfig`` fields for a named size.
    """

    def __init__(self, model: str = "llama_tiny", optim: Mapping | None = None, vocab_size: int | None = None,
                 seed: int = 0, warmup_steps: int = 0, min_lr_ratio: float = 0.1, total_steps: int | None = None,
                 grad_clip: float | None = 1.0, model_overrides: Mapping | None = None):
        super().__init__()
        optim = _plain(optim or {"name": "adamw", "lr": 1e-3})
        if "name" not in optim:
            raise ValueError("optim needs a 'name' (e.g. adamw, galore, frugal)")
        check_schedule(warmup_steps, total_steps, min_lr_ratio)
        if grad_clip is not None and (not isinstance(grad_clip, (int, float)) or isinstance(grad_clip, bool)
                                      or not math.isfinite(grad_clip) or grad_clip < 0):
            raise ValueError(f"module.grad_clip must be null or a finite number >= 0, got {grad_clip!r}")
        self.save_hyperparameters({"model": model, "optim": optim, "vocab_size": vocab_size, "seed": seed,
                                   "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "total_steps": total_steps, "grad_clip": grad_clip,
                                   "model_overrides": _plain(model_overrides or {})})
        self.model = build_model(model, vocab_size=vocab_size, seed=seed, **_plain(model_overrides or {}))
        self.optim_cfg = optim
        self.grad_clip = grad_clip or None
        self.batches_seen = 0  # training batches consumed; positions the data stream on resume
        self._optimizer = None
        self.mode = "automatic"
        self._val_sum = 0.0
        self._val_tokens = 0
        self.last_val_step = -1  # optimizer step of the last full validation
        self._worst_loss = None  # the first non-finite training loss since the last step, else the latest
        # Set by the run when resume.allow_changed lets an optimizer setting differ from the checkpoint's:
        # the saved state was built for the old settings, so the optimizer starts afresh.
        self.fresh_optimizer_state = False

    # -- optimizer -------------------------------------------------------------------------
    def build_optimizer(self):
        """Build the optimizer once (bad optimizer settings raise here) and pick the optimization mode."""
        if self._optimizer is None:
            from scrimp.optim import build

            optimizer = build(self.optim_cfg, self.model)
            mode = optimization_mode(optimizer)
            if mode == "layerwise" and self.grad_clip:
                raise ValueError(
                    "module.grad_clip must be null with a layer-wise optimizer: each layer is updated inside "
                    "backward, before a global gradient norm exists"
                )
            self._optimizer = optimizer
            self.mode = mode
            self.automatic_optimization = mode == "automatic"
            if mode == "automatic" and getattr(optimizer, "check_finite", None) is True:
                optimizer.check_finite = False  # on_before_optimizer_step checks the gradients already
        return self._optimizer

    @property
    def optimizer_name(self) -> str:
        return str(self.optim_cfg["name"])

    def _total_steps(self) -> int:
        if self.hparams.total_steps:
            return int(self.hparams.total_steps)
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            return int(trainer.estimated_stepping_batches)
        raise ValueError("module.total_steps is needed when no trainer gives max_steps")

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        check_layerwise_world_size(self.mode, self.trainer.world_size)
        scheduler = WarmupCosineScheduler(optimizer, self.hparams.warmup_steps, self._total_steps(),
                                          self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        scheduler.step()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # The module owns clipping (Lightning's trainer-level clipping refuses manual optimization).
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    # -- steps -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch of packed blocks (labels = inputs, shifted inside)."""
        return self.model(input_ids=input_ids, labels=input_ids).loss

    @staticmethod
    def _check_finite(loss: torch.Tensor, where: str) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"the {where} loss is {loss.item()}; stopping before it reaches the weights (lower optim.lr "
                "or enable module.grad_clip)"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        """Refuse a step whose loss (any micro-batch's) or gradients hold inf/NaN, before the optimizer
        writes them into the weights, by the library's one rule (``scrimp.optim.finite_guard``: one
        reduction per gradient, on CUDA kept on the device and read once, after backward, so the
        forward and backward launches never wait on the host). fp16 mixed precision leaves the
        gradients to its GradScaler, which skips such steps and lowers its scale by design.
        Layer-wise optimizers step inside backward (their loss is checked before it), zeroth-order
        ones have no gradients."""
        worst_loss, self._worst_loss = self._worst_loss, None
        scaled = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) is not None
        grads = [] if scaled else [p.grad for p in self.parameters() if p.grad is not None]
        # exact (no false alarm from a sum of finite entries that overflows), so a failure below names the cause
        flags = [all_finite_exact(grads)] if grads else []
        if worst_loss is not None:
            flags.append(torch.isfinite(worst_loss).all())
        if not flags:
            return
        bad = ~torch.stack([f.to(flags[0].device) for f in flags]).all()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every rank must stop together: a loss that is inf on one rank alone (its gradients
            # finite after the all-reduce) would leave the others waiting in the next collective.
            bad = trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        if not bool(bad):  # the one host read
            return
        if worst_loss is not None:
            self._check_finite(worst_loss, "training")
        if not any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self.parameters()):
            raise FloatingPointError("another rank's training loss or gradients hold inf or NaN; stopping with it "
                                     "before the optimizer step writes them into the weights")
        bad = next((name for name, p in self.named_parameters()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "a parameter")
        raise FloatingPointError(
            f"the gradient of {bad} holds inf or NaN although the loss is finite (here; under DDP another rank's may "
            "not be); stopping before the optimizer step writes it into the weights (lower optim.lr, or train in a "
            "wider dtype)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Lightning clears the gradients before validation and when fit starts (after a resume). Inside
        a layer-wise accumulation window they are the window's sums (a resume restores them), so the
        layer-wise optimizer decides: it clears them only at a window boundary."""
        if self.mode == "layerwise" and self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none)
        else:
            super().zero_grad(set_to_none)

    def on_train_start(self) -> None:
        self._worst_loss = None  # a fit stopped inside an accumulation window must not fail the next one

    def training_step(self, batch, batch_idx):
        input_ids = batch["input_ids"]
        self.batches_seen += 1
        lr = self._current_lr()  # the lr this step uses (manual modes step the scheduler inside)
        if self.mode == "automatic":
            loss = self(input_ids)
            # Checked with the gradients in on_before_optimizer_step (one host read per step); a
            # non-finite loss of any micro-batch is kept until then, without a sync here.
            worst = loss.detach()
            if self._worst_loss is not None:
                worst = torch.where(torch.isfinite(self._worst_loss), worst, self._worst_loss)
            self._worst_loss = worst
        elif self.mode == "zeroth_order":
            loss = self._zeroth_order_step(input_ids)
        else:
            loss = self._manual_step(input_ids)
        if is_logging_step(self._trainer):
            # Only on the steps the loggers write (and the last): each self.log call costs about 1 ms of
            # Python per step, a few % of a small model's step (benchmarks/train_step.py).
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
            self.log("train/lr", lr, on_step=True, on_epoch=False)
        return loss if self.mode == "automatic" else None

    def _zeroth_order_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        opt = self.optimizers()
        probes: list[torch.Tensor] = []

        def closure():
            # No finiteness check here: the ZO optimizer's contract is to skip a non-finite or
            # non-scalar loss itself (warn, count in ``skipped``, weights untouched); raising here
            # would stop the run before it can. The probes run in eval mode, as MeZO's zo_forward
            # does: dropout noise would swamp the difference f+ - f- that the step estimates.
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    loss = self(input_ids)
            finally:
                self.train(was_training)
            probes.append(loss.detach())
            return loss

        returned = opt.step(closure=closure)
        self._step_scheduler()
        skipped = getattr(self._optimizer, "skipped", None)
        if skipped is not None and is_logging_step(self._trainer):
            self.log("train/zo_skipped", float(skipped), on_step=True, on_epoch=False)
        if isinstance(returned, torch.Tensor):
            return returned.detach()
        # Skipped step: report the first probe's loss (possibly non-finite, which is why it was skipped).
        return probes[0] if probes else torch.tensor(float("nan"))

    def _manual_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        opt = self.optimizers()
        loss = self(input_ids)
        self._check_finite(loss, "training")
        self.manual_backward(loss)
        if self.mode == "manual" and self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        self._step_scheduler()
        return loss.detach()

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _current_lr(self) -> float:
        opt = self._optimizer
        groups = getattr(opt, "param_groups", None)
        return float(groups[0]["lr"]) if groups else float("nan")

    def validation_step(self, batch, batch_idx):
        input_ids = batch["input_ids"]
        weight = batch.get("weight")  # under DDP: 0 on the rows that only pad a rank's share
        if weight is None:
            loss = self(input_ids)
            n = input_ids[:, 1:].numel()  # predicted tokens per batch (the first of each row has no label)
            self._val_sum += float(loss.detach().float()) * n
            self._val_tokens += n
            return loss
        logits = self.model(input_ids=input_ids).logits[:, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(),
                                                      reduction="none").view(input_ids.shape[0], -1)
        row_weight = weight.to(per_token.dtype)
        self._val_sum += float((per_token.sum(1) * row_weight).sum())
        self._val_tokens += round(float(row_weight.sum())) * per_token.shape[1]
        return per_token.mean()

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_tokens = 0.0, 0

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val_sum, float(self._val_tokens)], dtype=torch.float64)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum").cpu()
        if totals[1] <= 0:
            return
        val_loss = float(totals[0] / totals[1])
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step
        # Already reduced over ranks; sync_dist only averages equal values (and keeps every rank informed).
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", math.exp(min(val_loss, 50.0)), sync_dist=True)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["scrimp"] = {"batches_seen": self.batches_seen, "optimizer_name": self.optimizer_name,
                                "optim": self.optim_cfg}
        if "optimizer_states" in checkpoint:
            mark_zeroth_order_full_save(self._optimizer, checkpoint["optimizer_states"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("scrimp", {})
        self.batches_seen = int(saved.get("batches_seen", 0))
        if self.fresh_optimizer_state and "optimizer_states" in checkpoint:
            # Lightning restores optimizer_states after this hook: hand it the new optimizer's own fresh
            # state, so the run truly trains with the new settings (weights, step and schedule are kept).
            checkpoint["optimizer_states"] = [self.build_optimizer().state_dict()]
            return
        check_checkpoint_optimizer(saved.get("optimizer_name"), self.optimizer_name, "the checkpoint")


def check_checkpoint_optimizer(saved_name: str | None, current_name: str, where: str) -> None:
    """Raise one sentence when a checkpoint's optimizer differs from the configured one."""
    if saved_name is not None and saved_name != current_name:
        raise ValueError(
            f"{where} was written with optimizer {saved_name!r} but optim.name is {current_name!r}; "
            f"resume with optim={saved_name} or start a fresh run without ckpt_path"
        )


def mark_zeroth_order_full_save(optimizer, optimizer_states: list) -> None:
    """A full Lightning checkpoint (parameters + optimizer state) holds a ZO optimizer: empty its replay log.

    Follows ``scrimp.optim.zo.checkpoint.save_full``: the (seed, projected gradient) log only has to
    reach back to the last full save of the parameters (MeZO, Malladi et al. 2023, Sec. 2), so the
    checkpoint stores an empty log and the optimizer forgets its own (``mark_full_save``); without
    this the log, saved in every checkpoint, grows by one record per step forever. Called from
    ``on_save_checkpoint``, when the checkpoint dict already holds the parameters and the state.
    Weights-only checkpoints carry no optimizer state and leave the log alone.
    """
    mark = getattr(optimizer, "mark_full_save", None)
    if not getattr(optimizer, "is_zeroth_order", False) or mark is None:
        return
    for state in optimizer_states:
        if isinstance(state, dict) and isinstance(state.get("zo"), dict):
            state["zo"] = dict(state["zo"], log=[])
    mark()
