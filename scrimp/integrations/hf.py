"""scrimp's optimizers inside Hugging Face ``transformers.Trainer`` (``pip install 'scrimp[hf]'``).

    from scrimp.integrations.hf import ScrimpTrainer
    trainer = ScrimpTrainer(model=model, args=args, train_dataset=ds,
                            scrimp_optim={"name": "galore", "lr": 1e-2, "rank": 128,
                                          "optim_target_modules": ["attn", "mlp"]})
    trainer.train()

``scrimp_optim`` is what ``scrimp.optim.build`` takes (any optimizer name: adamw, adamw8bit, galore,
galore8bit, frugal, zo_sgd, zo_adam; ``layerwise=True`` with ``accumulate``), plus HF's spelling
``optim_target_modules`` for ``target_modules``. The learning-rate schedule stays the Trainer's
(``args.lr_scheduler_type``, warmup, ...): it acts on the optimizer's own ``param_groups``, which for
a layer-wise optimizer are the inner optimizer's, so the schedule reaches the layer-wise updates.

Why a subclass and not ``optimizer_cls_and_kwargs``: the Trainer then builds its own decay/no-decay
groups, which have no place for the projected group; and two modes need the training step itself:

- layer-wise: each parameter steps inside backward; the Trainer's ``optimizer.step()`` at the end of
  each accumulation window applies that window (``accumulate`` must equal
  ``gradient_accumulation_steps``). Global clipping is impossible there, so ``max_grad_norm`` must be 0.
- zeroth-order: no backward at all; the training step runs the forward-only probes of each
  micro-batch (``optimizer.accumulate(closure)``) and the Trainer's ``optimizer.step()`` applies the
  window. There are no gradients to clip, so ``max_grad_norm`` must be 0.

A ready optimizer can be passed as usual too: ``ScrimpTrainer(..., optimizers=(opt, None))`` gets the
same checks. The plain ``Trainer(optimizers=(opt, None))`` works for the ordinary (non-layer-wise,
first-order) optimizers.
"""

from __future__ import annotations

from typing import Any

import torch

from scrimp._extras import require

require("accelerate", "transformers.Trainer")
transformers = require("transformers", "scrimp.integrations.hf")

HF_TARGET_KEY = "optim_target_modules"


def _plain_cfg(cfg: Any) -> dict:
    """``scrimp_optim`` as a dict, with HF's ``optim_target_modules`` renamed to scrimp's key."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    if not isinstance(cfg, dict):
        raise TypeError(f"scrimp_optim must be a dict with a 'name' key, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if HF_TARGET_KEY in cfg:
        if cfg.get("target_modules") is not None:
            raise ValueError("scrimp_optim sets both target_modules and optim_target_modules; give one of them")
        cfg["target_modules"] = cfg.pop(HF_TARGET_KEY)
    return cfg


def check_trainer_args(optimizer: torch.optim.Optimizer, args) -> None:
    """Refuse, in one sentence, TrainingArguments the optimizer's mode cannot honour."""
    accumulation = int(args.gradient_accumulation_steps)
    clip = args.max_grad_norm
    if getattr(optimizer, "is_layerwise", False):
        if clip:
            raise ValueError(f"max_grad_norm={clip} cannot apply to layer-wise updates (each parameter steps "
                             "inside backward, before the global norm is known): set max_grad_norm=0")
        if optimizer.accumulate != accumulation:
            raise ValueError(f"the layer-wise optimizer accumulates {optimizer.accumulate} micro-batches but "
                             f"gradient_accumulation_steps={accumulation}: set them equal")
    if getattr(optimizer, "is_zeroth_order", False) and clip:
        raise ValueError(f"max_grad_norm={clip} cannot apply to a zeroth-order optimizer (it computes no "
                         "gradients): set max_grad_norm=0")


def build_for_trainer(model: torch.nn.Module, scrimp_optim: Any, args) -> torch.optim.Optimizer:
    """``scrimp.optim.build`` for a Trainer's model, after HF spelling and TrainingArguments checks."""
    from scrimp.optim import build

    optimizer = build(_plain_cfg(scrimp_optim), model)
    check_trainer_args(optimizer, args)
    return optimizer


class ScrimpTrainer(transformers.Trainer):
    """``transformers.Trainer`` that builds a scrimp optimizer (module doc) and drives its mode."""

    def __init__(self, *args, scrimp_optim: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        if scrimp_optim is not None and self.optimizer is not None:
            raise ValueError("give either scrimp_optim or optimizers=(optimizer, scheduler), not both")
        if scrimp_optim is not None:
            _plain_cfg(scrimp_optim)  # a bad spelling fails here, before the data loaders are built
        self.scrimp_optim = scrimp_optim

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.scrimp_optim is not None:
            self.optimizer = build_for_trainer(self.model if model is None else model, self.scrimp_optim, self.args)
        elif self.optimizer is None:
            return super().create_optimizer(model)
        else:
            check_trainer_args(self.optimizer, self.args)
        return self.optimizer

    def _zeroth_order(self) -> torch.optim.Optimizer | None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer
        return inner if getattr(inner, "is_zeroth_order", False) else None

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        optimizer = self._zeroth_order()
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            return self.compute_loss(model, inputs)

        with torch.no_grad():
            loss = optimizer.accumulate(closure)  # applied by the Trainer's optimizer.step() at the window's end
        if loss is None:  # the optimizer skipped a non-finite micro-batch (and says so)
            return torch.tensor(float("nan"), device=self.args.device)
        # the Trainer adds the returned losses of a window for its log; the update averages them itself
        return loss.detach() / self.args.gradient_accumulation_steps
