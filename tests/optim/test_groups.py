"""param_groups on a real transformers LLaMA: which weights get projected."""

import pytest
import torch

from scrimp.optim import param_groups
from scrimp.training.models import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("llama_tiny", vocab_size=256, seed=0)


def test_all_linear_projects_attention_and_mlp_but_not_head_or_embeddings(tiny):
    groups = param_groups(tiny, rank=8, update_proj_gap=50)
    projected = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in tiny.named_parameters() if id(p) in projected}
    expect = {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    assert names == {f"{n}.weight" for n in expect}
    assert groups[0]["rank"] == 8 and groups[0]["update_proj_gap"] == 50
    plain = {n for n, p in tiny.named_parameters() if any(p is q for q in groups[1]["params"])}
    assert "lm_head.weight" in plain and "model.embed_tokens.weight" in plain
    assert len(projected) + len(groups[1]["params"]) == len(list(tiny.parameters()))


def test_regex_targets_and_no_match_error(tiny):
    groups = param_groups(tiny, [r"self_attn\.(q|v)_proj"], rank=4)
    assert len(groups[0]["params"]) == 2 * tiny.config.num_hidden_layers
    with pytest.raises(ValueError, match="matched no nn.Linear weight"):
        param_groups(tiny, [r"does_not_exist"], rank=4)
