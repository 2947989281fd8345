"""Helpers of the training and entry-point tests: composed configs on a small, fixed slice of the stdlib corpus.

The tokenizer and token caches go to one temporary folder per test session, so the tests run from
a clean cache every time and train the tokenizer once.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# llama_tiny on 30 stdlib files, 32-token blocks, batch 4, vocab 512: a step takes milliseconds.
SMALL = [
    "data.max_documents=30",
    "data.vocab_size=512",
    "data.block_size=32",
    "data.batch_size=4",
    "data.val_blocks=8",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "print_table=false",
    "module.warmup_steps=0",
]


def compose_train(overrides: list[str]):
    """The ``train`` config composed by Hydra's compose API (what ``@hydra.main`` would build)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


