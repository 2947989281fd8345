"""The engine refuses compositions it cannot compute, and its state checks follow the parts' declarations.

Review fixes of issue 14: an output rule that reads R along the projected side needs a projector that
gives it so; a residual rule needs an orthonormal projector (G - P P^T G is the complement only then);
a registered name is never silently replaced; a rule key the group's rule does not take is refused;
every rule setting is fixed on load unless the rule declares it resumable; output-rule state and
history stacks are shape-checked; ``state_bytes`` counts every inner rule's state as moments.
"""

import ast
import inspect
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from scrimp.optim import GaLoreAdamW8bit, NaturalGaLoreAdamW, SubspaceAdamW
from scrimp.optim.memory import state_bytes
from scrimp.optim.projection import KINDS, PROJECTORS, Projector
from scrimp.optim.rules import registry
from scrimp.optim.rules.adam import AdamRule
from scrimp.optim.rules.apollo import apollo_projection, apollo_seed
from scrimp.optim.rules.base import InnerRule, MomentSpec, OutputRule, ResidualRule
from scrimp.optim.rules.residual import SignSGD
from scrimp.optim.state_check import StateDictMismatch

M, N = 12, 20  # std projects from the left: R is (r, N)


def weight(seed=0, shape=(M, N)):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def run(opt, params, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


# -- 1. compositions a projector cannot serve ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["columns", "rows", "randk"])
def test_apollo_output_with_a_projector_whose_R_is_not_along_the_side_is_refused(kind):
    W = weight()
    with pytest.raises(ValueError, match=rf"output='apollo'.*projector={kind!r}"):
        SubspaceAdamW([{"params": [W], "rank": 2}], output="apollo", projector=kind)
    assert torch.equal(W, weight())


@pytest.mark.parametrize("kind", ["svd", "random", "gaussian", "randperm"])
def test_apollo_output_with_a_projector_along_the_side_steps(kind):
    W = weight()
    opt = SubspaceAdamW([{"params": [W], "rank": 2}], output="apollo", projector=kind)
    run(opt, [W])
    assert torch.isfinite(W).all() and not torch.equal(W, weight())


def test_randperm_under_apollo_scales_each_channel_as_its_dense_selection_matrix_would():
    """randperm is a 0/1 orthonormal P: the output rule must see the same R as with that P built densely."""
    W = weight()
    opt = SubspaceAdamW([{"params": [W], "rank": 3}], output="apollo", projector="randperm", lr=0.1)
    G = torch.randn(M, N, generator=torch.Generator().manual_seed(5))
    W.grad = G.clone()
    s = opt.begin(W, opt.param_groups[0], W.grad)
    P = torch.zeros(M, 3)
    P[s.basis.long(), torch.arange(3)] = 1.0
    torch.testing.assert_close(s.R, P.t() @ G, rtol=0, atol=0)


def test_an_output_rule_that_declares_any_R_is_taken_with_any_projector():
    @registry.register_output
    class ScaleByNormRatio(OutputRule):
        name = "test_any_R_output"
        needs_side_shaped_R: ClassVar[bool] = False

        def full_update(self, G, R, N, state, hp):
            return G * (N.norm() / R.norm())

    try:
        W = weight()
        run(SubspaceAdamW([{"params": [W], "rank": 2}], output=ScaleByNormRatio.name, projector="randk"), [W])
        assert torch.isfinite(W).all()
    finally:
        registry.OUTPUT_RULES.pop(ScaleByNormRatio.name)


@pytest.mark.parametrize("residual", ["sign_sgd", "sgd", "scaled"])
def test_a_residual_with_a_projector_that_is_not_orthonormal_is_refused(residual):
    with pytest.raises(ValueError, match=rf"residual={residual!r}.*projector='gaussian'"):
        SubspaceAdamW([{"params": [weight()], "rank": 2}], projector="gaussian", residual=residual)


def test_the_kinds_declare_what_the_checks_read():
    """Declarations, not name lists: every kind says whether its P is orthonormal and how R is laid out."""
    for kind in PROJECTORS:
        assert isinstance(KINDS[kind].orthonormal, bool) and isinstance(KINDS[kind].side_shaped_R, bool)
    assert not KINDS["gaussian"].orthonormal
    assert [k for k in PROJECTORS if not KINDS[k].side_shaped_R] == ["rows", "columns", "randk"]


def test_the_gaussian_kind_gives_its_matrix():
    """Projector.matrix asks the kind: a Gaussian projector has no proj_P in its state."""
    proj = Projector("gaussian", (M, N), 3, "left", gap=5, seed=7)
    state = {"proj_refresh": 2}
    expected = apollo_projection(M, 3, "left", apollo_seed(7, 2), "cpu")
    assert torch.equal(proj.matrix(state, torch.device("cpu")), expected)


# -- 2. the registries ----------------------------------------------------------------------------------
def test_a_different_class_under_a_registered_name_is_refused():
    class Impostor(InnerRule):
        name = "adam"

    with pytest.raises(ValueError, match=r"^the inner rule name 'adam' is already registered to "
                                         r"scrimp\.optim\.rules\.adam\.AdamRule; give "):
        registry.register_inner(Impostor)
    assert registry.INNER_RULES["adam"] is AdamRule

    class ImpostorResidual(ResidualRule):
        name = "sign_sgd"

    with pytest.raises(ValueError, match="^the residual rule name 'sign_sgd' is already registered"):
        registry.register_residual(ImpostorResidual)
    assert type(registry.RESIDUAL_RULES["sign_sgd"]) is SignSGD


def test_the_same_class_registers_again_and_a_reloaded_one_replaces_it():
    assert registry.register_inner(AdamRule) is AdamRule and registry.INNER_RULES["adam"] is AdamRule
    # A module reloaded (or a test file collected again) defines a new class object with the same
    # module and qualified name: that is the same rule, and it takes the name over.
    reloaded = type("AdamRule", (AdamRule,), {"__module__": AdamRule.__module__, "__qualname__": AdamRule.__qualname__})
    try:
        registry.register_inner(reloaded)
        assert registry.INNER_RULES["adam"] is reloaded
    finally:
        registry.INNER_RULES["adam"] = AdamRule


# -- 3. rule keys the group's rule does not take ---------------------------------------------------------
def test_a_group_key_of_another_inner_rule_is_refused():
    with pytest.raises(ValueError, match=r"^momentum is a setting of inner rule 'sgd'; this group's inner rule "
                                         r"'adam' takes \[\]"):
        SubspaceAdamW([{"params": [weight()], "rank": 2, "momentum": 0.5}])


def test_a_constructor_key_of_another_inner_rule_is_refused():
    with pytest.raises(ValueError, match=r"^natural_history is a setting of inner rule 'natural'; this group's "
                                         r"inner rule 'sgd' takes \['dampening', 'momentum', 'nesterov', "
                                         r"'sign_update'\]"):
        SubspaceAdamW([{"params": [weight()], "rank": 2}], inner="sgd", natural_history=3)


def test_a_constructor_key_must_be_taken_by_every_projected_group():
    groups = [{"params": [weight(0)], "rank": 2}, {"params": [weight(1)], "rank": 2, "inner": "adam"}]
    with pytest.raises(ValueError, match="momentum is a setting of inner rule 'sgd'"):
        SubspaceAdamW(groups, inner="sgd", momentum=0.5)


def test_an_output_rule_key_without_that_output_rule_is_refused():
    with pytest.raises(ValueError, match=r"^apollo_mode is a setting of output rule 'apollo'; this group's output "
                                         r"rule None takes \[\]"):
        SubspaceAdamW([{"params": [weight()], "rank": 2, "apollo_mode": "tensor"}])


def test_rule_keys_the_rule_takes_pass_and_plain_groups_keep_their_own_keys():
    W, b = weight(), torch.nn.Parameter(torch.zeros(N))
    opt = SubspaceAdamW([{"params": [W], "rank": 2, "momentum": 0.5}, {"params": [b]}], inner="sgd")
    assert opt.param_groups[0]["momentum"] == 0.5 and "momentum" not in opt.param_groups[1]


# -- 4. rule settings are fixed on load unless declared resumable ---------------------------------------------
def saved(make, steps=2):
    W = weight()
    opt = make([W])
    run(opt, [W], steps)
    return opt.state_dict()


@pytest.mark.parametrize("key, ours, theirs", [
    ("momentum", dict(momentum=0.5), dict(momentum=0.9)),
    ("nesterov", dict(nesterov=True), dict(nesterov=False)),
    ("sign_update", dict(sign_update=True), dict(sign_update=False)),
    ("dampening", dict(dampening=0.1), dict(dampening=0.0)),
])
def test_sgd_settings_are_fixed_on_load(key, ours, theirs):
    def make(settings):
        return lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], inner="sgd", **settings)

    state = saved(make(theirs))
    target = make(ours)([weight()])
    with pytest.raises(StateDictMismatch, match=rf"group 0's {key} is"):
        target.load_state_dict(state)


def test_natural_history_and_apollo_mode_are_fixed_on_load():
    state = saved(lambda ps: NaturalGaLoreAdamW([{"params": ps, "rank": 2}], natural_history=3))
    with pytest.raises(StateDictMismatch, match="group 0's natural_history is 3 in the state dict and 4"):
        NaturalGaLoreAdamW([{"params": [weight()], "rank": 2}], natural_history=4).load_state_dict(state)

    def apollo(mode):
        return lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], projector="gaussian", output="apollo",
                                        apollo_mode=mode)

    with pytest.raises(StateDictMismatch, match="group 0's apollo_mode is 'channel' in the state dict and 'tensor'"):
        apollo("tensor")([weight()]).load_state_dict(saved(apollo("channel")))


@pytest.fixture
def knob_rule():
    @registry.register_inner
    class KnobRule(InnerRule):
        """Adam with two test knobs: ``fixed_knob`` changes what the state means, ``free_knob`` does not."""

        name = "test_knobs"
        group_keys: ClassVar[dict] = {"fixed_knob": 1, "free_knob": 1.0}
        resumable_keys: ClassVar[tuple] = ("free_knob",)

        def __init__(self, fixed_knob=1, free_knob=1.0):
            self.adam = AdamRule()

        def moment_specs(self):
            return self.adam.moment_specs()

        def direction(self, R, moments, hp):
            return self.adam.direction(R, moments, hp)

    yield KnobRule
    registry.INNER_RULES.pop(KnobRule.name)


def test_a_resumable_rule_key_may_change_on_load_and_a_fixed_one_may_not(knob_rule):
    def make(**knobs):
        return lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], inner=knob_rule.name, **knobs)

    state = saved(make(fixed_knob=1, free_knob=1.0))
    target = make(fixed_knob=1, free_knob=2.0)([weight()])
    target.load_state_dict(state)
    assert target.param_groups[0]["free_knob"] == 1.0  # restored from the state dict, as torch restores lr
    with pytest.raises(StateDictMismatch, match="group 0's fixed_knob is 1 in the state dict and 2"):
        make(fixed_knob=2)([weight()]).load_state_dict(state)


def test_a_saved_group_without_a_rule_key_loads_with_the_rules_default():
    state = saved(lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], inner="sgd"))
    del state["param_groups"][0]["nesterov"]  # a state written before the rule took the key
    target = SubspaceAdamW([{"params": [weight()], "rank": 2}], inner="sgd")
    target.load_state_dict(state)
    assert target.param_groups[0]["nesterov"] is False
    with pytest.raises(StateDictMismatch, match="nesterov"):
        SubspaceAdamW([{"params": [weight()], "rank": 2}], inner="sgd", nesterov=True).load_state_dict(state)


# -- 5. output-rule state and history stacks are shape-checked ---------------------------------------------
def apollo_state():
    return saved(lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], projector="gaussian", output="apollo"))


def test_a_wrong_shaped_output_rule_state_is_refused():
    state = apollo_state()
    assert state["state"][0]["limiter_norm"].shape == ()
    state["state"][0]["limiter_norm"] = torch.ones(3)
    opt = SubspaceAdamW([{"params": [weight()], "rank": 2}], projector="gaussian", output="apollo")
    with pytest.raises(StateDictMismatch, match=r"limiter_norm of shape \(3,\) in the state dict, expected \(\)"):
        opt.load_state_dict(state)


def test_output_rule_state_in_a_group_without_that_rule_is_refused():
    state = saved(lambda ps: SubspaceAdamW([{"params": ps, "rank": 2}], projector="random"))
    state["state"][0]["limiter_norm"] = torch.ones(())
    with pytest.raises(StateDictMismatch, match="limiter_norm"):
        SubspaceAdamW([{"params": [weight()], "rank": 2}], projector="random").load_state_dict(state)


@pytest.mark.parametrize("moments_8bit", [False, True])
def test_a_history_stack_of_the_wrong_length_is_refused_in_both_stores(moments_8bit):
    shape = (64, 256)  # R is (8, 256): 2048 entries per slice, a 3-slice stack of 6144 (8-bit would quantize it)

    def make(ps):
        return SubspaceAdamW([{"params": ps, "rank": 8}], inner="natural", natural_history=3,
                             moments_8bit=moments_8bit)

    W = weight(shape=shape)
    opt = make([W])
    run(opt, [W], 2)
    state = opt.state_dict()
    assert state["state"][0]["grad_history"].shape == (3, 8, 256)  # never quantized: it feeds a solve
    state["state"][0]["grad_history"] = torch.zeros(2, 8, 256)
    with pytest.raises(StateDictMismatch, match=r"grad_history of shape \(2, 8, 256\) in the state dict, expected "
                                                r"\(3, 8, 256\)"):
        make([weight(shape=shape)]).load_state_dict(state)


# -- 6. state_bytes counts every inner rule's state as moments ------------------------------------------------
def test_state_bytes_counts_the_natural_history_as_moments():
    rank, history = 2, 3
    W = weight()
    opt = NaturalGaLoreAdamW([{"params": [W], "rank": rank}], natural_history=history)
    run(opt, [W], 1)
    got = state_bytes(opt)
    assert got["moments"] == (2 + history) * rank * N * 4 and got["other"] == 0
    assert got["projectors"] == M * rank * 4


def test_state_bytes_counts_a_new_rules_state_as_moments():
    @registry.register_inner
    class Accumulator(InnerRule):
        name = "test_accumulator"

        def moment_specs(self):
            return (MomentSpec("running_total", signed=True),)

        def direction(self, R, moments, hp):
            return moments["running_total"].add_(R).clone()

    try:
        W = weight()
        opt = SubspaceAdamW([{"params": [W], "rank": 2}], inner=Accumulator.name)
        run(opt, [W], 1)
        assert state_bytes(opt)["moments"] == 2 * N * 4
    finally:
        registry.INNER_RULES.pop(Accumulator.name)


def test_state_bytes_of_8bit_moments_counts_codes_and_absmax_as_moments():
    W = weight(shape=(64, 256))
    opt = GaLoreAdamW8bit([{"params": [W], "rank": 32}])
    run(opt, [W], 1)
    assert state_bytes(opt)["moments"] == 2 * (32 * 256 + 32 * 4)


# -- 8. the step path reads at once -------------------------------------------------------------------------
STEP_PATH = ["subspace.py", "projection.py", "functional.py", "moments.py", "state_check.py", "memory.py",
             "rules/base.py", "rules/registry.py", "rules/adam.py", "rules/residual.py", "rules/lion.py", "rules/sgd.py",
             "rules/natural.py", "rules/apollo.py", "layerwise.py", "kernels/fused.py", "kernels/__init__.py",
             "kernels/checks.py"]
MAX_BODY_LINES = 40


def long_functions(path: Path) -> list[str]:
    """Functions whose body, without the docstring, spans more than MAX_BODY_LINES lines."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_BODY_LINES:
                found.append(f"{path.name}:{node.name}")
    return found


def test_no_function_on_the_step_path_is_longer_than_40_lines():
    root = Path(inspect.getfile(SubspaceAdamW)).parent
    assert [f for name in STEP_PATH for f in long_functions(root / name)] == []


def test_the_length_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES + 1))
    path = tmp_path / "probe.py"
    path.write_text(f'def f():\n    """doc"""\n{body}\n')
    assert long_functions(path) == ["probe.py:f"]
    path.write_text(f'def f():\n    """doc"""\n{body.split(chr(10), 1)[1]}\n')
    assert long_functions(path) == []
