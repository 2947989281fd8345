"""Named LLaMA sizes, as in the GaLore paper (Zhao et al., 2024, Table 8), plus a tiny CPU one.

    from scrimp.training.models import build_model
    model = build_model("llama_60m")            # random init, transformers LlamaForCausalLM
    model = build_model("path/or/hub-name")     # from_pretrained when it is not a known size
"""

from __future__ import annotations

import os
from dataclasses import dataclass


# hidden, intermediate (FFN), heads, layers. Vocabulary 32000 (the T5 tokenizer of the paper),
# context 256 for pre-training, as in the paper's C4 runs.
@dataclass(frozen=True)
class LlamaSize:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int = 32000
    max_position_embeddings: int = 256


LLAMA_SIZES: dict[str, LlamaSize] = {
    # Small enough for tests and a 10-minute CPU demo; vocab follows the tokenizer when given.
    "llama_tiny": LlamaSize(128, 344, 4, 2, vocab_size=4096, max_position_embeddings=256),
    "llama_60m": LlamaSize(512, 1376, 8, 8),
    "llama_130m": LlamaSize(768, 2048, 12, 12),
    "llama_350m": LlamaSize(1024, 2736, 16, 24),
    "llama_1b": LlamaSize(2048, 5461, 32, 24),
    "llama_7b": LlamaSize(4096, 11008, 32, 32),
}


def llama_config(name: str, vocab_size: int | None = None, **overrides):
    """A transformers ``LlamaConfig`` for a named size; ``vocab_size`` follows the tokenizer."""
    from transformers import LlamaConfig

    if name not in LLAMA_SIZES:
        raise ValueError(f"model name {name!r} is not a known size; choose one of {sorted(LLAMA_SIZES)}")
    size = LLAMA_SIZES[name]
    kwargs = dict(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        num_hidden_layers=size.num_hidden_layers,
        vocab_size=vocab_size or size.vocab_size,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(name_or_path: str, vocab_size: int | None = None, seed: int | None = None, **overrides):
    """A ``LlamaForCausalLM``: a named size with random init, or ``from_pretrained`` for a path/hub name."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if name_or_path in LLAMA_SIZES:
        config = llama_config(name_or_path, vocab_size=vocab_size, **overrides)
        if seed is not None:
            torch.manual_seed(seed)
        return LlamaForCausalLM(config)
    local = os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~"))
    if local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ValueError(f"model {name_or_path!r} looks like a local path, but no such directory exists")
    if local or "/" in name_or_path:
        try:
            return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), **overrides)
        except (OSError, ValueError) as err:  # a hub name offline or unknown, a folder without a model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model {name_or_path!r} could not be loaded with from_pretrained: {first}") from err
    raise ValueError(
        f"model {name_or_path!r} is neither a known size ({', '.join(sorted(LLAMA_SIZES))}) "
        "nor a local directory or hub name of the form 'org/name'"
    )
