"""No non-finite gradient reaches a weight through a library optimizer used directly (issue 13, item 6).

References: the guard's verdict against ``torch.isfinite`` per tensor (brute force); a refused step
against a snapshot taken before it (bitwise); a guarded run against the same run unguarded (bitwise).
"""

import copy
import re
import warnings

import pytest
import torch

from scrimp.optim import ZOSGD, FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW
from scrimp.optim.finite_guard import all_finite_exact, all_finite_flag, first_nonfinite

BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [*BAD_VALUES, "+inf and -inf"])
def test_the_guard_finds_every_non_finite_entry_wherever_it_is(dtype, bad):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in [(300, 70), (5,), (64, 33), (1,), (4097,)]]
    assert first_nonfinite(tensors) is None
    for which in range(len(tensors)):
        for trial in range(4):
            poisoned = [t.clone() for t in tensors]
            flat = poisoned[which].view(-1)
            spots = torch.randint(flat.numel(), (2,), generator=gen)
            if bad == "+inf and -inf":  # a sum of +inf and -inf is NaN: still caught
                flat[spots[0]], flat[spots[1]] = float("inf"), float("-inf")
            else:
                flat[spots[0]] = BAD_VALUES[bad]
            expect = next(i for i, t in enumerate(poisoned) if not torch.isfinite(t).all())
            assert first_nonfinite(poisoned) == expect == which, (which, trial)


def test_finite_entries_whose_sum_overflows_are_cleared_by_the_exact_search():
    big = torch.full((4,), 3e38)  # finite, but their fp32 sum is inf
    assert not bool(all_finite_flag([big]))
    assert first_nonfinite([torch.ones(3), big]) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_exact_verdict_is_the_brute_force_one_and_never_a_false_alarm(dtype):
    # The verdict layer-wise updates and the Lightning module take (one rule for the library): it
    # must equal torch.isfinite over every entry, also where the cheap sum overflows (huge, finite).
    huge = torch.finfo(dtype).max / 2
    gen = torch.Generator().manual_seed(1)
    cases = {"finite": [torch.randn(40, 7, generator=gen).to(dtype), torch.full((300,), huge, dtype=dtype)]}
    for bad in BAD_VALUES.values():
        poisoned = [t.clone() for t in cases["finite"]]
        poisoned[1][17] = bad
        cases[f"{bad}"] = poisoned
    for name, tensors in cases.items():
        expect = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert bool(all_finite_exact(tensors)) is expect, name
        assert all_finite_exact(tensors).shape == ()
    # the case is real: the sum alone raises a false alarm there (fp16 is summed in fp32, which cannot overflow)
    assert dtype == torch.float16 or not bool(all_finite_flag(cases["finite"]))


def test_sparse_gradients_are_judged_by_their_stored_values_and_meta_tensors_are_skipped():
    dense = torch.zeros(6, 3)
    dense[4] = torch.tensor([1.0, float("nan"), 2.0])
    sparse = dense.to_sparse()
    assert not bool(all_finite_exact([sparse])) and first_nonfinite([torch.ones(2), sparse]) == 1
    assert bool(all_finite_exact([torch.zeros(6, 3).to_sparse(), torch.empty(4, device="meta")]))
    assert bool(all_finite_exact([torch.empty(4, device="meta")]))


def model_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(12, 20), (20, 12), (64, 128), (7,), (4096,)]]


OPTIMIZERS = {
    "GaLoreAdamW": lambda ps: GaLoreAdamW([{"params": ps[:3], "rank": 3}, {"params": ps[3:]}], update_proj_gap=2),
    "GaLoreAdamW8bit": lambda ps: GaLoreAdamW8bit([{"params": ps[:3], "rank": 3},
                                                   {"params": ps[3:]}], update_proj_gap=2),
    "FrugalAdamW (randk)": lambda ps: FrugalAdamW([{"params": ps[:3], "density": 0.25}, {"params": ps[3:]}],
                                                  update_gap=2),
    "FrugalAdamW (svd)": lambda ps: FrugalAdamW([{"params": ps[:3], "density": 0.25}, {"params": ps[3:]}],
                                                update_gap=2, proj_type="svd"),
    "SubspaceAdamW (scaled residual)": lambda ps: SubspaceAdamW([{"params": ps[:3], "rank": 3}, {"params": ps[3:]}],
                                                                residual="scaled", update_proj_gap=2),
}


def set_grads(ps, step):
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))


def snapshot(opt, ps):
    weights = [p.detach().clone() for p in ps]
    state = [{k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
             for p in ps]
    return weights, state, copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_bitwise(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]) if torch.is_tensor(sx[k]) else sx[k] == sy[k], k
    assert a[2] == b[2]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("where", [0, 1, 3])  # a projected matrix of each side, and a plain vector
def test_a_non_finite_gradient_raises_and_changes_no_weight_and_no_state(name, bad, where):
    ps = model_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](ps)
        for t in range(2):  # state exists, and the next step is a refresh of some projectors
            set_grads(ps, t)
            opt.step()
        set_grads(ps, 2)
        ps[where].grad.view(-1)[5] = BAD_VALUES[bad]
        before = snapshot(opt, ps)
        group, index = (0, where) if where < 3 else (1, where - 3)
        where_text = re.escape(f"the gradient of parameter {index} of group {group} (shape {tuple(ps[where].shape)})")
        with pytest.raises(FloatingPointError, match=where_text + " holds inf or NaN"):
            opt.step()
    assert_bitwise(snapshot(opt, ps), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_finite_gradients_give_bitwise_the_result_of_the_unguarded_step(name):
    runs = []
    for check in (True, False):
        ps = model_params()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = OPTIMIZERS[name](ps)
            opt.check_finite = check
            for t in range(5):  # over two refreshes
                set_grads(ps, t)
                ps[4].grad = None if t == 3 else ps[4].grad  # a parameter without a gradient is skipped
                opt.step()
        runs.append(snapshot(opt, ps))
    assert_bitwise(*runs)


def test_the_guard_is_on_by_default_and_can_be_turned_off_with_a_bool():
    ps = model_params()
    assert GaLoreAdamW(ps[:1]).check_finite and FrugalAdamW(ps[:1]).check_finite
    assert SubspaceAdamW(ps[:1]).check_finite
    with pytest.raises(ValueError, match="check_finite must be True or False, got 'no'"):
        SubspaceAdamW(ps[:1], check_finite="no")
    off = GaLoreAdamW([{"params": ps[:1], "rank": 2}], check_finite=False)
    ps[0].grad = torch.full_like(ps[0], float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SVD's fallback warning for a NaN gradient
        off.step()  # the caller chose to check elsewhere: nothing stops it here
    assert torch.isnan(ps[0]).all()


def test_zeroth_order_refuses_a_non_finite_projected_gradient_before_booking_it():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 10))]
    opt = ZOSGD(ps, perturbation="inplace")
    opt.step(lambda: (ps[0] ** 2).sum())
    record = opt.make_record([123], [float("nan")])
    before, steps = ps[0].detach().clone(), opt.steps
    with pytest.raises(FloatingPointError, match="grads hold inf or NaN"):
        opt.commit(record)
    with pytest.raises(FloatingPointError, match="grads hold inf or NaN"):
        opt.replay([record])
    assert torch.equal(ps[0], before) and opt.steps == steps and len(opt.log) == 1


def test_the_training_module_turns_the_guard_off_because_it_checks_the_gradients_itself():
    # scrimp.training's on_before_optimizer_step already checks every gradient once per step (and
    # across DDP ranks); paying twice would only slow the step. Built directly, the guard stays on.
    from scrimp.optim import build
    from scrimp.training.module import CausalLMModule

    module = CausalLMModule("llama_tiny", {"name": "galore", "rank": 8}, vocab_size=256)
    assert module.build_optimizer().check_finite is False
    assert build({"name": "galore", "rank": 8}, module.model).check_finite is True


def test_a_refused_zeroth_order_step_consumes_no_draw():
    # Two finite losses whose difference overflows make a non-finite projected gradient: refused,
    # and the next step draws the directions that a run which never met the refused step would draw.
    ps = [torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))]
    opt = ZOSGD(ps, lr=1e-3, eps=1e-3, seed=5)  # hook: probes never touch the weights
    calls = {"n": 0}

    def wild():  # +1e308 at theta + eps z, -1e308 at theta - eps z: both finite, the difference is not
        calls["n"] += 1
        return torch.tensor(1e308 if calls["n"] % 2 else -1e308, dtype=torch.float64)

    before, draws, steps = ps[0].detach().clone(), opt.draws, opt.steps
    with pytest.raises(FloatingPointError, match="grads hold inf or NaN"):
        opt.step(wild)
    assert torch.equal(ps[0], before) and (opt.draws, opt.steps) == (draws, steps)
    reference = ZOSGD([torch.nn.Parameter(before.clone())], lr=1e-3, eps=1e-3, seed=5)
    opt.step(lambda: (ps[0] ** 2).sum())
    reference.step(lambda: (reference.param_groups[0]["params"][0] ** 2).sum())
    assert torch.equal(ps[0], reference.param_groups[0]["params"][0])
