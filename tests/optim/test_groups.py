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


# -- GPT-2: transformers' Conv1D (issue 13, item 8) -------------------------------------------------
GPT2_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
U32 = 2.0 ** -24  # fp32 unit roundoff


def gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def by_name(model, **projection):
    """How galore-torch users build GaLore groups: by parameter name."""
    projected = [p for n, p in model.named_parameters() if n.endswith(".weight") and any(t in n for t in GPT2_TARGETS)]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    return [{"params": projected, **projection}, {"params": rest}]


def test_all_linear_projects_gpt2s_conv1d_weights_but_not_the_tied_head():
    model = gpt2()
    groups = param_groups(model, rank=4)
    assert names_of(model, groups[0]["params"]) == names_of(model, by_name(model)[0]["params"])
    assert len(groups[0]["params"]) == 4 * 2
    plain = names_of(model, groups[1]["params"])
    assert "transformer.wte.weight" in plain  # the head is tied to it: it stays plain
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("targets, expect", [
    ([".*c_attn"], {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}),
    ("transformer.h.1.mlp.c_fc", {"transformer.h.1.mlp.c_fc.weight"}),  # transformers: re.fullmatch of one string
    ([r"h\.0\.mlp\.c_proj", "h.1.attn.c_proj"], {"transformer.h.0.mlp.c_proj.weight",
                                                  "transformer.h.1.attn.c_proj.weight"}),  # regex, substring
    ("all_linear", {f"transformer.h.{i}.{t}.weight" for i in range(2) for t in GPT2_TARGETS}),
])
def test_target_modules_select_conv1d_modules_by_name(targets, expect):
    model = gpt2()
    assert names_of(model, param_groups(model, targets, rank=4)[0]["params"]) == expect


@pytest.mark.parametrize("targets, message", [
    (["nothing_here"], r"^target_modules=\['nothing_here'\] matched no nn.Linear weight of the model \(nor a "
                       r"transformers Conv1D\)$"),
    (["c_attn("], r"^target_modules entry 'c_attn\(' is not a valid regular expression"),
    ([], r"^target_modules must be 'all-linear' or a non-empty list of module-name patterns"),
    (3, r"^target_modules must be 'all-linear' or a non-empty list of module-name patterns"),
    ([None], r"^target_modules must be 'all-linear' or a non-empty list of module-name patterns"),
    (None, r"^target_modules must be 'all-linear' or a non-empty list of module-name patterns"),
    ("", r"^target_modules must be 'all-linear' or a non-empty list of module-name patterns"),
])
def test_bad_target_modules_are_one_sentence(targets, message):
    with pytest.raises(ValueError, match=message):
        param_groups(gpt2(), targets, rank=4)


def teacher_forced_run(ref, ref_opt, ours, our_opt, steps, seed=1):
    """The reference model makes every gradient; ours gets copies, so only the optimizers' arithmetic
    can differ. Returns, per parameter, the difference that arithmetic allows (the bound below)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0.0] * len(list(ref.parameters()))
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        ref_opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(ref.parameters(), ours.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in ref.parameters()]
        ref_opt.step()
        our_opt.step()
        # Each weight gets the same update computed in another order: the update carries a relative
        # error of at most (2 * 128 + 16) u (projection and back-projection are dot products of length
        # <= 128, the largest dimension here; Adam's moments, bias corrections and division add about
        # 16 rounded operations), and adding it to the weight rounds once in each run (2 u |w|). The
        # gradients are teacher-forced, so nothing feeds back: the bounds of the steps add up.
        for i, (p, b) in enumerate(zip(ref.parameters(), before)):
            bounds[i] += ((2 * 128 + 16) * U32 * (p - b).abs().max() + 2 * U32 * p.abs().max()).item()
    return bounds


@pytest.mark.parametrize("proj_type", ["std", "left"])
def test_gpt2_parity_with_galore_torch_groups_built_by_name(proj_type):
    # galore-torch projects each weight as stored: a Conv1D's (in, out) matrix. So do we, so that
    # "left"/"right" agree with it (for a Conv1D "left" is the input side).
    galore_torch = pytest.importorskip("galore_torch")
    from scrimp.optim import GaLoreAdamW

    projection = dict(rank=4, update_proj_gap=4, scale=0.25, proj_type=proj_type)
    ref, ours = gpt2(), gpt2()
    ref_opt = galore_torch.GaLoreAdamW(by_name(ref, **projection), lr=1e-2, no_deprecation_warning=True)
    # galore-torch keeps LAPACK's signs and refreshes every parameter at once: the parity options
    our_opt = GaLoreAdamW(param_groups(ours, **projection), lr=1e-2, stagger=False, sign_rule="solver")
    bounds = teacher_forced_run(ref, ref_opt, ours, our_opt, steps=10)  # refreshes at steps 0, 4 and 8
    assert our_opt.state[ours.transformer.h[0].attn.c_attn.weight]["proj_refresh"] == 2  # two after the first
    for (name, p), q, bound in zip(ours.named_parameters(), ref.parameters(), bounds):
        assert (p - q).abs().max().item() <= bound, name
    start = gpt2()
    moved = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), start.parameters()))
    assert moved > 1e3 * max(bounds)  # the weights really moved, far beyond the tolerance
