"""Loaded optimizer state is checked before anything is replaced (issue 13, item 3, library part).

References: state dicts written by the code before the checks existed (tests/optim/data, written by
``make_untagged_states.py`` at commit 19dfa67) must keep loading and step bitwise as an optimizer
whose state was put in place by hand; every refused load leaves the optimizer bitwise as it was.
"""

import copy
import warnings
from pathlib import Path

import pytest
import torch

from scrimp.optim import ZOSGD, FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW, ZOAdam
from scrimp.optim.state_check import StateDictMismatch
from scrimp.optim.zo import restore, save_full, save_log

FIXTURES = torch.load(Path(__file__).with_name("data") / "untagged_states.pt", weights_only=True)


def groups(ps, split=2, **projection):
    return [{"params": ps[:split], **projection}, {"params": ps[split:]}]


# The constructors make_untagged_states.py used, one per fixture.
MAKERS = {
    "galore": lambda ps: GaLoreAdamW(groups(ps, rank=2), update_proj_gap=2),
    "galore8bit": lambda ps: GaLoreAdamW8bit(groups(ps, split=1, rank=32), update_proj_gap=2),
    "frugal": lambda ps: FrugalAdamW(groups(ps, density=0.25), update_gap=2, proj_type="svd"),
    "frugal_randk": lambda ps: FrugalAdamW(groups(ps, density=0.25), update_gap=2),
    "frugal_blocks": lambda ps: FrugalAdamW(groups(ps, split=3, density=0.5), update_gap=2, proj_type="blocks"),
    "zosgd": lambda ps: ZOSGD(ps, momentum=0.5, perturbation="inplace"),
    "zoadam": lambda ps: ZOAdam(ps, perturbation="inplace"),
}
FIRST_ORDER = ["galore", "galore8bit", "frugal", "frugal_randk", "frugal_blocks"]


def fresh_params(name):
    return [torch.nn.Parameter(p.detach().clone()) for p in FIXTURES[name][0]]


def snapshot(opt):
    """Everything a load could change: groups (without params) and every state entry, deep-copied."""
    groups_ = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]  # by position: comparable across optimizers
    state = {i: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    extra = {k: copy.deepcopy(getattr(opt, k)) for k in ("draws", "steps", "skipped", "window", "log")
             if hasattr(opt, k)}
    return groups_, state, extra


def assert_same(a, b):
    (ga, sa, ea), (gb, sb, eb) = a, b
    assert ga == gb
    assert sa.keys() == sb.keys()
    for pid in sa:
        assert sa[pid].keys() == sb[pid].keys()
        for key, value in sa[pid].items():
            if torch.is_tensor(value):
                assert value.dtype == sb[pid][key].dtype and torch.equal(value, sb[pid][key]), key
            else:
                assert value == sb[pid][key], key
    assert repr(ea) == repr(eb)


def put_state_by_hand(opt, ps, saved):
    """The reference for a load: the saved per-parameter state placed directly, no load_state_dict."""
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for pid, p in zip(ids, ps):
        if pid in saved["state"]:
            opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved["state"][pid].items()}


def first_order_step(opt, ps, seed):
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i))
    opt.step()


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_untagged_state_dicts_of_the_old_code_load_and_step_as_placed_by_hand(name):
    _, saved = FIXTURES[name]
    assert all("scrimp_optimizer" not in g for g in saved["param_groups"])  # written before the tag
    loaded_ps, by_hand_ps = fresh_params(name), fresh_params(name)
    loaded, by_hand = MAKERS[name](loaded_ps), MAKERS[name](by_hand_ps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' import chatter
        loaded.load_state_dict(saved)
        put_state_by_hand(by_hand, by_hand_ps, saved)
        for t in range(3):  # over a refresh (update_proj_gap 2) and a block switch
            first_order_step(loaded, loaded_ps, 1000 + 10 * t)
            first_order_step(by_hand, by_hand_ps, 1000 + 10 * t)
    for a, b in zip(loaded_ps, by_hand_ps):
        assert torch.equal(a, b)
    assert_same(snapshot(loaded), snapshot(by_hand))


@pytest.mark.parametrize("name", ["zosgd", "zoadam"])
def test_untagged_zeroth_order_state_dicts_load_and_step_as_placed_by_hand(name):
    _, saved = FIXTURES[name]
    loaded_ps, by_hand_ps = fresh_params(name), fresh_params(name)
    loaded, by_hand = MAKERS[name](loaded_ps), MAKERS[name](by_hand_ps)
    loaded.load_state_dict(saved)
    put_state_by_hand(by_hand, by_hand_ps, saved)
    zo = saved["zo"]
    by_hand.draws, by_hand.steps, by_hand.skipped = zo["draws"], zo["steps"], zo["skipped"]
    by_hand.window, by_hand.log = list(zo["window"]), list(zo["log"])
    for opt, ps in ((loaded, loaded_ps), (by_hand, by_hand_ps)):
        for _ in range(2):
            opt.step(lambda ps=ps: sum((p**2).sum() for p in ps))
    for a, b in zip(loaded_ps, by_hand_ps):
        assert torch.equal(a, b)
    assert_same(snapshot(loaded), snapshot(by_hand))


def refused(opt, state_dict, *fragments):
    """Load must raise one sentence holding ``fragments`` and leave ``opt`` bitwise unchanged."""
    before = snapshot(opt)
    with pytest.raises(StateDictMismatch) as err:
        opt.load_state_dict(state_dict)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot load this state dict into {type(opt).__name__}")
    for fragment in fragments:
        assert fragment in message, message
    assert_same(snapshot(opt), before)
    return message


def stepped(opt, ps, steps=1):
    for t in range(steps):
        first_order_step(opt, ps, 10 * t)
    return opt


def test_the_resized_parameter_reproduction_is_one_sentence_and_loads_nothing():
    # issue 13: today this goes into torch._fused_adamw_ out of bounds, NaN weights, then an abort
    a = torch.nn.Parameter(torch.randn(1))
    opt = stepped(GaLoreAdamW([a]), [a])
    b = torch.nn.Parameter(torch.zeros(8))
    target = stepped(GaLoreAdamW([b]), [b])  # a stepped target: nothing of its own state may be lost
    refused(target, opt.state_dict(), "parameter 0 of group 0 (shape (8,))", "exp_avg of shape (1,)", "expected (8,)")


def test_torch_adamw_state_from_a_file_is_refused_naming_its_writer():
    # torch's AdamW has one group here and GaLore two: put GaLore in one group so the class check decides
    refused(GaLoreAdamW([{"params": fresh_params("galore")}]), FIXTURES["adamw"][1], "torch.optim.AdamW")


def test_torch_adamw_state_written_by_a_live_optimizer_is_refused():
    src = fresh_params("galore")
    adamw = torch.optim.AdamW(src)
    stepped(adamw, src)
    refused(GaLoreAdamW([{"params": fresh_params("galore")}]), adamw.state_dict(), "torch.optim.AdamW",
            "without moment_step")


def test_state_of_another_model_is_refused_before_step():
    torch.manual_seed(0)
    small = [torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10))]
    other = [torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(12))]
    saved = stepped(GaLoreAdamW(groups(small, split=1, rank=2)), small).state_dict()
    refused(stepped(GaLoreAdamW(groups(other, split=1, rank=2)), other), saved,
            "parameter 0 of group 0 (shape (12, 10))", "proj_P of shape (6, 2)", "expected (10, 2)")
    fewer = [torch.nn.Parameter(torch.randn(6, 10))]
    refused(GaLoreAdamW([{"params": fewer, "rank": 2}]), saved, "2 param group(s), this optimizer 1")


def test_galore_state_into_frugal_and_back_is_refused_by_class():
    ps = fresh_params("galore")
    galore = stepped(GaLoreAdamW(groups(ps, rank=2), update_proj_gap=2), ps)
    frugal = stepped(FrugalAdamW(groups(fresh_params("galore"), rank=2), update_gap=2, proj_type="svd"),
                     fresh_params("galore"))
    refused(FrugalAdamW(groups(fresh_params("galore"), rank=2), update_gap=2, proj_type="svd"), galore.state_dict(),
            "written by GaLoreAdamW")
    refused(GaLoreAdamW(groups(fresh_params("galore"), rank=2), update_proj_gap=2), frugal.state_dict(),
            "written by FrugalAdamW")


@pytest.mark.parametrize("source,target", [("galore", "frugal"), ("frugal", "galore"), ("frugal_randk", "galore")])
def test_untagged_galore_and_frugal_states_do_not_cross(source, target):
    # Same parameters; the old dicts carry no tag, so their settings give them away.
    refused(MAKERS[target](fresh_params(target)), FIXTURES[source][1], "group 0's")


def test_rank_2_state_into_a_rank_3_optimizer_names_both_values():
    ps = fresh_params("galore")
    saved = stepped(GaLoreAdamW(groups(ps, rank=2)), ps).state_dict()
    message = refused(GaLoreAdamW(groups(fresh_params("galore"), rank=3)), saved, "rank is 2", "and 3")
    assert "group 0" in message


def test_frugal_settings_are_named_with_frugal_words():
    ps = fresh_params("frugal")
    saved = stepped(FrugalAdamW(groups(ps, density=0.25), update_gap=2), ps).state_dict()
    refused(FrugalAdamW(groups(fresh_params("frugal"), density=0.25), update_gap=3), saved,
            "update_gap (update_proj_gap) is 2", "and 3")


def plain_and_projected(**kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(20, 12)),
          torch.nn.Parameter(torch.randn(7))]
    return ps, SubspaceAdamW([{"params": ps[:2], "rank": 3}, {"params": ps[2:]}], update_proj_gap=5, **kw)


def saved_from(**kw):
    ps, opt = plain_and_projected(**kw)
    return stepped(opt, ps, 2).state_dict()


def edited(state_dict, pid, key, value):
    out = copy.deepcopy(state_dict)
    out["state"][pid][key] = value
    return out


def edited_group(state_dict, index, **changes):
    out = copy.deepcopy(state_dict)
    out["param_groups"][index].update(changes)
    return out


# Every way a state can fail to fit: (what, optimizer settings, the state dict, words the sentence holds).
BAD = {
    "plain moment of another shape": ({}, lambda sd: edited(sd, 2, "exp_avg", torch.zeros(8)),
                                      ["parameter 0 of group 1 (shape (7,))", "(8,)"]),
    "projected moment of another rank": ({}, lambda sd: edited(sd, 0, "exp_avg_sq", torch.zeros(4, 20)),
                                         ["exp_avg_sq of shape (4, 20)", "expected (3, 20)"]),
    "projector of another rank": ({}, lambda sd: edited(sd, 1, "proj_P", torch.zeros(12, 4)),
                                  ["proj_P of shape (12, 4)", "expected (12, 3)"]),
    "projector of the other side": ({}, lambda sd: edited(sd, 1, "proj_P", torch.zeros(20, 3)),
                                    ["proj_P of shape (20, 3)", "expected (12, 3)", "right side"]),
    "8-bit moments into fp32": ({}, lambda sd: edited(sd, 2, "exp_avg_q", torch.zeros(7, dtype=torch.uint8)),
                                ["exp_avg_q"]),
    "a tensor step (torch's)": ({}, lambda sd: edited(sd, 2, "step", torch.tensor(2.0)), ["step", "integer"]),
    "a float moment_step": ({}, lambda sd: edited(sd, 0, "moment_step", 2.5), ["moment_step", "integer"]),
    "one group fewer": ({}, lambda sd: {**sd, "param_groups": sd["param_groups"][:1]},
                        ["1 param group(s)", "this optimizer 2"]),
    "a parameter more": ({}, lambda sd: edited_group(sd, 1, params=[2, 3]), ["group 1", "2 parameter(s)", "holds 1"]),
    "another projector": ({}, lambda sd: edited_group(sd, 0, projector="gram"), ["projector is 'gram'", "'svd'"]),
    "another side": ({}, lambda sd: edited_group(sd, 0, proj_type="left"), ["proj_type is 'left'", "'std'"]),
    "a residual rule": ({}, lambda sd: edited_group(sd, 0, residual="sgd"), ["residual is 'sgd'"]),
    "another refresh gap": ({}, lambda sd: edited_group(sd, 0, update_proj_gap=7), ["update_proj_gap is 7", "and 5"]),
    "density instead of rank": ({}, lambda sd: edited_group(sd, 0, rank=None, density=0.25), ["rank is None"]),
    "a plain group saved as projected": ({}, lambda sd: edited_group(sd, 1, rank=2), ["group 1's rank is 2"]),
    "another class tag": ({}, lambda sd: {**sd, "param_groups": [dict(g, scrimp_optimizer="GaLoreAdamW8bit")
                                                                  for g in sd["param_groups"]]},
                          ["written by GaLoreAdamW8bit"]),
    "not a state dict": ({}, lambda sd: {"state": sd["state"]}, ["not an optimizer state dict"]),
    "a list of groups only": ({}, lambda sd: sd["param_groups"], ["not an optimizer state dict"]),
}


@pytest.mark.parametrize("what", list(BAD))
def test_every_misfit_is_one_sentence_and_leaves_the_optimizer_bitwise_unchanged(what):
    settings, make_bad, fragments = BAD[what]
    ps, opt = plain_and_projected(**settings)
    stepped(opt, ps, 1)
    refused(opt, make_bad(saved_from(**settings)), *fragments)


def test_coordinate_indices_are_checked_against_their_bound_and_length():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(12, 20))]
    make = lambda: FrugalAdamW([{"params": ps, "density": 0.25}], proj_type="columns")  # noqa: E731
    saved = stepped(make(), ps).state_dict()
    index = saved["state"][0]["proj_index"]
    assert index.shape == (5,)  # floor(0.25 * 20) columns
    refused(make(), edited(saved, 0, "proj_index", index + 20), "proj_index values in", "[0, 19]")
    refused(make(), edited(saved, 0, "proj_index", index[:4]), "proj_index of shape (4,)", "expected (5,)")


def test_eight_bit_moments_are_checked_by_their_block_count():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 128))]
    make = lambda: GaLoreAdamW8bit([{"params": ps, "rank": 32}])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = stepped(make(), ps).state_dict()
        assert saved["state"][0]["exp_avg_absmax"].shape == (16,)  # 32 * 128 entries / 256 per block
        refused(make(), edited(saved, 0, "exp_avg_absmax", torch.zeros(15)), "exp_avg_absmax of shape (15,)",
                "expected (16,)")
        refused(GaLoreAdamW([{"params": ps, "rank": 32}]), saved, "written by GaLoreAdamW8bit")


def test_settings_a_resume_may_change_pass_and_are_restored_as_torch_does():
    ps = fresh_params("galore")
    saved = stepped(GaLoreAdamW(groups(ps, rank=2), lr=1e-3, weight_decay=0.0, scale=0.25), ps).state_dict()
    target = GaLoreAdamW(groups(fresh_params("galore"), rank=2), lr=5e-2, betas=(0.8, 0.99), weight_decay=0.1,
                         scale=0.5, seed=3)
    target.load_state_dict(saved)
    for group, old in zip(target.param_groups, saved["param_groups"]):
        for key in ("lr", "betas", "weight_decay"):
            assert group[key] == old[key]
    assert target.param_groups[0]["scale"] == 0.25 and target.param_groups[0]["seed"] == 0
    assert all("scrimp_optimizer" not in g for g in target.param_groups)  # the tag never becomes a group key


def test_state_saved_on_another_device_loads_by_logical_shape():
    # The meta device stands in for another device: shapes are compared, never devices.
    ps = fresh_params("galore")
    saved = stepped(GaLoreAdamW(groups(ps, rank=2)), ps).state_dict()
    meta = [torch.nn.Parameter(p.detach().to("meta")) for p in ps]
    opt = GaLoreAdamW(groups(meta, rank=2))
    opt.load_state_dict(saved)
    for p, entry in zip(meta, saved["state"].values()):
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert opt.state[p][key].device.type == "meta" and opt.state[p][key].shape == value.shape


def zo_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10))]


def zo_stepped(opt, ps, steps=2):
    for _ in range(steps):
        opt.step(lambda: sum((p**2).sum() for p in ps))
    return opt


def test_zeroth_order_misfits_are_one_sentence_and_load_nothing():
    ps = zo_params()
    adam = zo_stepped(ZOAdam(ps, perturbation="inplace"), ps).state_dict()
    sgd = zo_stepped(ZOSGD(ps, momentum=0.9, perturbation="inplace"), ps).state_dict()
    other = [torch.nn.Parameter(torch.randn(4, 10)), torch.nn.Parameter(torch.randn(10))]
    refused(zo_stepped(ZOAdam(other, perturbation="inplace"), other), adam,
            "parameter 0 of group 0 (shape (4, 10))", "exp_avg of shape (6, 10)")
    refused(ZOSGD(zo_params(), momentum=0.9), adam, "written by ZOAdam")
    refused(ZOSGD(zo_params(), momentum=0.5), sgd, "momentum is 0.9", "0.5")
    refused(ZOSGD(zo_params(), momentum=0.9), FIXTURES["galore"][1], "GaLoreAdamW")
    refused(GaLoreAdamW(zo_params()), sgd, "written by ZOSGD")
    bad_record = copy.deepcopy(sgd)
    bad_record["zo"]["window"][-1]["grads"] = torch.tensor([float("nan")], dtype=torch.float64)
    refused(ZOSGD(zo_params(), momentum=0.9), bad_record, "record 1 of its window", "inf or NaN")
    bad_lrs = copy.deepcopy(sgd)
    bad_lrs["zo"]["log"][0] = dict(bad_lrs["zo"]["log"][0], lrs=torch.tensor([1e-3, 1e-3], dtype=torch.float64))
    refused(ZOSGD(zo_params(), momentum=0.9), bad_lrs, "record 0 of its log", "2 lrs for 1 parameter group")


def test_zeroth_order_restore_checks_both_files_before_writing_a_weight(tmp_path):
    ps = zo_params()
    opt = zo_stepped(ZOSGD(ps, perturbation="inplace"), ps)
    save_full(tmp_path / "full.pt", ps, opt)
    zo_stepped(opt, ps)
    save_log(tmp_path / "log.pt", opt)
    log = torch.load(tmp_path / "log.pt", weights_only=True)
    log["records"][1]["grads"] = torch.tensor([float("inf")], dtype=torch.float64)
    torch.save(log, tmp_path / "bad_log.pt")
    target = [torch.nn.Parameter(torch.zeros_like(p)) for p in ps]
    fresh = ZOSGD(target, perturbation="inplace")
    with pytest.raises(ValueError, match="bad_log.pt: record 1 cannot be replayed"):
        restore(target, fresh, tmp_path / "full.pt", tmp_path / "bad_log.pt")
    assert all(not p.any() for p in target) and fresh.steps == 0
    wrong = ZOSGD(target, momentum=0.5, perturbation="inplace")
    with pytest.raises(StateDictMismatch, match="momentum is 0.0 in the state dict and 0.5"):
        restore(target, wrong, tmp_path / "full.pt", tmp_path / "log.pt")
    assert all(not p.any() for p in target) and wrong.steps == 0
