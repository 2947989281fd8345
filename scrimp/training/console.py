"""What a training run prints: one line per log message, and a progress bar that counts the run's steps.

- ``single_log_handler``: the ``lightning`` package adds its own console handler *and* lets its
  records propagate, so under Hydra (which configures the root logger) every Lightning INFO line
  was printed twice, once plain on stderr and once in Hydra's format. With a configured root
  logger, Lightning's own handler goes and the root's (console and the job's log file) stays.
- ``StepProgressBar``: Lightning's rich bar reads ``Epoch 0/-2`` when ``max_steps`` bounds the run
  (``max_epochs`` is then -1), and after a resume it counts the resumed epoch's batches from 0
  against the *remaining* steps (``60/10``). When ``max_steps`` bounds the run, this bar shows the
  run's optimizer steps against ``max_steps``, resumed or not.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import RichProgressBar


def single_log_handler() -> int:
    """Drop Lightning's own console handlers when the root logger has handlers; returns how many went.

    Called by the entry point after Hydra has configured logging; the records then reach the root's
    handlers once. Without a configured root (plain API use) nothing changes: Lightning's handler is
    then the only one."""
    if not logging.getLogger().handlers:
        return 0
    removed = 0
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # console handlers only; a user's file handler stays
                logger.removeHandler(handler)
                removed += 1
        logger.propagate = True
    return removed


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps of the whole run when ``max_steps`` is set."""

    def _by_steps(self) -> bool:
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._by_steps():
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._by_steps():
            return "Step"
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)
