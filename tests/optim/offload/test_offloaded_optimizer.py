"""Tests for scrimp/optim/offload/optimizer.py: offloaded equals in-memory, bitwise (DESIGN "Principles").

The reference is the wrapped optimizer itself stepping on the same gradients, with the same LR
scheduler, gradient clipping and two-micro-batch accumulation; resume from an offloaded checkpoint
must equal the uninterrupted run, into any tier and into no offload.
"""

import errno
import io
import os
import re

import pytest
import torch

from scrimp.optim import (
    ZOSGD,
    ApolloAdamW,
    FrugalAdamW,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    SubspaceAdamW,
    layerwise,
    param_groups,
)
from scrimp.optim.offload import OffloadedOptimizer, tiers

STEPS = 20
MAKERS = {
    # stagger with gap 5: every matrix refreshes inside the run
    "galore": lambda m: GaLoreAdamW(param_groups(m, rank=8, update_proj_gap=5), lr=1e-2, weight_decay=0.1),
    "galore_rotate": lambda m: GaLoreAdamW(param_groups(m, rank=8, update_proj_gap=5), lr=1e-2,
                                           moment_policy="rotate"),
    "frugal": lambda m: FrugalAdamW(param_groups(m, density=0.25), lr=1e-2, update_gap=5),
    # BAdam blocks: an inactive block drops its moments, so the tier holds nothing for it for a while
    "frugal_blocks": lambda m: FrugalAdamW(param_groups(m, density=0.5), lr=1e-2, update_gap=4, proj_type="blocks"),
    # rank 48 of the (128, 96) weight: 4608 moment entries >= MIN_8BIT_NUMEL, so they are 8-bit
    "galore8bit": lambda m: GaLoreAdamW8bit(param_groups(m, rank=48, update_proj_gap=5), lr=1e-2),
    "apollo": lambda m: ApolloAdamW(param_groups(m, rank=8, update_proj_gap=5), lr=1e-2, weight_decay=0.1),
    "natural": lambda m: SubspaceAdamW(param_groups(m, rank=8, update_proj_gap=5), lr=1e-2, inner="natural",
                                       natural_history=3),
}


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))


def micro_batches(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(6, 96, generator=gen) for _ in range(2)]


def wrap(engine, tier, path):
    if tier is None:
        return engine
    return OffloadedOptimizer(engine, tier=tier, path=path if tier == "disk" else None, prefetch=2)


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))


def train(net, opt, sched, steps):
    """Two accumulated micro-batches, global clipping (active: the norm exceeds 0.05), step, schedule."""
    for step in steps:
        for x in micro_batches(step):
            (net(x).pow(2).mean() / 2).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)
        opt.step()
        sched.step()
        opt.zero_grad()


def run(name, tier, path, steps=range(STEPS)):
    net = model()
    opt = wrap(MAKERS[name](net), tier, path)
    sched = schedule(opt)
    train(net, opt, sched, steps)
    return net, opt, sched


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {float((p - q).detach().abs().max()):.3e}"


def assert_same_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        assert state.keys() == b["state"][index].keys(), index
        for key, value in state.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only contend on a shared machine (the runs compared use the same count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_runs(one_thread):
    return {name: run(name, None, None) for name in MAKERS}


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("name", MAKERS)
def test_offloaded_equals_in_memory_bitwise(name, tier, tmp_path, plain_runs):
    net, opt, _ = run(name, tier, tmp_path / "tier")
    ref_net, ref_opt, _ = plain_runs[name]
    assert_same_weights(ref_net, net)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    if name == "galore8bit":  # the 8-bit store really ran through the tier
        assert any(key.endswith("_q") for state in opt.state_dict()["state"].values() for key in state)
    opt.close()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_the_engine_state_keeps_no_moments_between_steps(tier, tmp_path):
    net, opt, _ = run("galore", tier, tmp_path / "tier", steps=range(3))
    for state in opt.optimizer.state.values():
        assert not {"exp_avg", "exp_avg_sq"} & state.keys()
    assert "proj_P" in opt.optimizer.state[net[0].weight]  # the projector stays with the engine
    if tier == "disk":
        files = sorted(f for f in os.listdir(tmp_path / "tier") if f.endswith(".bin"))
        assert len(files) == 4 and sum(os.path.getsize(tmp_path / "tier" / f) for f in files) == opt.tier.reserved
    opt.close()


def saved_and_loaded(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["galore", "galore8bit", "frugal_blocks"])
@pytest.mark.parametrize("into", ["cpu", "disk", None])
def test_resume_from_a_disk_checkpoint_is_bitwise(name, into, tmp_path, plain_runs):
    half = STEPS // 2
    net, opt, sched = run(name, "disk", tmp_path / "first", steps=range(half))
    checkpoint = saved_and_loaded({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    opt.close()
    net2 = model(seed=1)  # other weights: everything must come from the checkpoint
    net2.load_state_dict(checkpoint["model"])
    opt2 = wrap(MAKERS[name](net2), into, tmp_path / "second")
    sched2 = schedule(opt2)  # before the optimizer's state, as a training script builds them
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    train(net2, opt2, sched2, range(half, STEPS))
    assert_same_weights(plain_runs[name][0], net2)
    assert_same_state(plain_runs[name][1].state_dict(), opt2.state_dict())


def test_an_offloaded_optimizer_resumes_a_plain_checkpoint_bitwise(tmp_path, plain_runs):
    half = STEPS // 2
    net, opt, sched = run("galore", None, None, steps=range(half))
    checkpoint = saved_and_loaded({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    net2 = model(seed=1)
    net2.load_state_dict(checkpoint["model"])
    opt2 = wrap(MAKERS["galore"](net2), "disk", tmp_path / "tier")
    sched2 = schedule(opt2)
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    train(net2, opt2, sched2, range(half, STEPS))
    assert_same_weights(plain_runs["galore"][0], net2)
    opt2.close()


def test_wrapping_an_optimizer_that_already_stepped_moves_its_moments(tmp_path, plain_runs):
    net = model()
    engine = MAKERS["galore"](net)
    sched = schedule(engine)
    train(net, engine, sched, range(4))
    opt = OffloadedOptimizer(engine, tier="disk", path=tmp_path / "tier")
    sched.optimizer = opt  # the scheduler goes on with the same groups
    assert not any("exp_avg" in state for state in engine.state.values())
    train(net, opt, sched, range(4, STEPS))
    assert_same_weights(plain_runs["galore"][0], net)
    opt.close()


def test_it_is_a_torch_optimizer_sharing_the_groups():
    net = model()
    engine = MAKERS["galore"](net)
    opt = OffloadedOptimizer(engine)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is engine.param_groups and opt.state is engine.state
    opt.param_groups[0]["lr"] = 0.5
    assert engine.param_groups[0]["lr"] == 0.5
    extra = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert engine.param_groups[-1]["params"][0] is extra
    extra.grad = torch.ones(5)
    opt.step()
    assert "exp_avg" not in engine.state[extra] and opt.state_dict()["state"][4]["exp_avg"].shape == (5,)


def test_a_nonfinite_gradient_changes_nothing(tmp_path):
    net, opt, _ = run("galore", "disk", tmp_path / "tier", steps=range(3))
    before = saved_and_loaded(opt.state_dict())
    weights = [p.detach().clone() for p in net.parameters()]
    for x in micro_batches(3):
        net(x).pow(2).mean().backward()
    net[2].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    assert_same_state(before, opt.state_dict())
    opt.close()


# -- faults and refusals -------------------------------------------------------------------------------


def test_a_path_that_cannot_be_a_directory_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    engine = MAKERS["galore"](model())
    with pytest.raises(ValueError, match="path must be a writable directory"):
        OffloadedOptimizer(engine, tier="disk", path=blocker / "tier")


def test_a_read_only_directory_is_one_sentence(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("running as a user who can write to a read-only directory (root)")
        with pytest.raises(ValueError, match="path must be a writable directory"):
            OffloadedOptimizer(MAKERS["galore"](model()), tier="disk", path=target)
    finally:
        target.chmod(0o700)


def test_a_full_disk_is_one_sentence_before_the_first_step_and_frees_the_path(tmp_path):
    net = model()
    engine = MAKERS["galore"](net)
    with pytest.raises(OSError, match="no room for the state of parameter"):
        OffloadedOptimizer(engine, tier="disk", path=tmp_path / "tier", max_bytes=8192)
    assert all(p.grad is None for p in net.parameters()) and not engine.state  # nothing ran
    opt = OffloadedOptimizer(engine, tier="disk", path=tmp_path / "tier")  # the failed one released the lock
    opt.close()


def test_a_second_optimizer_on_the_same_path_is_refused(tmp_path):
    first = OffloadedOptimizer(MAKERS["galore"](model()), tier="disk", path=tmp_path / "tier")
    with pytest.raises(ValueError, match="is in use by another disk tier"):
        OffloadedOptimizer(MAKERS["galore"](model()), tier="disk", path=tmp_path / "tier")
    first.close()
    OffloadedOptimizer(MAKERS["galore"](model()), tier="disk", path=tmp_path / "tier").close()


@pytest.mark.parametrize("make, match", [
    (lambda m: ZOSGD(m.parameters(), lr=1e-3), "zeroth-order"),
    (lambda m: layerwise(m, lambda groups: GaLoreAdamW(groups, lr=1e-3)), "layer-wise"),
    (lambda m: torch.optim.AdamW(m.parameters()), "must be a scrimp SubspaceAdamW"),
])
def test_optimizers_it_cannot_drive_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        OffloadedOptimizer(make(model()))


@pytest.mark.parametrize("kwargs, match", [
    ({"tier": "ssd"}, "tier must be one of"),
    ({"tier": "disk"}, "path is required"),
    ({"tier": "cpu", "path": "/tmp/x"}, "belong to tier='disk'"),
    ({"tier": "cpu", "prefetch": -1}, "prefetch must be an integer >= 0"),
])
def test_bad_arguments_are_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadedOptimizer(MAKERS["galore"](model()), **kwargs)


# -- a run killed in the middle of a tier write --------------------------------------------------------

KILLED_RUN = r"""
import importlib.util, itertools, os, sys, time
import torch
from scrimp.optim.offload import OffloadedOptimizer, tiers

test_file, tier_path, checkpoint, marker = sys.argv[1:]
spec = importlib.util.spec_from_file_location("offload_tests", test_file)
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
torch.set_num_threads(1)  # as the parent's runs
net = t.model()
opt = OffloadedOptimizer(t.MAKERS["galore"](net), tier="disk", path=tier_path, prefetch=1)
sched = t.schedule(opt)
write_whole = tiers.write_from


def torn_write(fd, tensor, offset):
    # half of one state tensor reaches its file; the parent kills this process before the rest does
    write_whole(fd, tensor.contiguous().reshape(-1).view(torch.uint8)[: tensor.numel() * tensor.itemsize // 2],
                offset)
    open(marker, "w").close()
    time.sleep(120)


for step in itertools.count():
    t.train(net, opt, sched, [step])
    if step % 3 == 2:  # a checkpoint every third step, written atomically
        torch.save({"step": step + 1, "model": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict()}, checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)
    if step == 8:  # the refresh at step 10 and later writes go on after the checkpoint of step 9
        tiers.write_from = torn_write
"""


def test_a_run_killed_during_a_tier_write_resumes_from_its_checkpoint_bitwise(tmp_path, plain_runs):
    """SIGKILL while a disk-tier write is half done: the tier's files are torn and ahead of the
    checkpoint, which is the source of truth. A new optimizer on the same path (the dead process's
    lock is gone) resumes from the checkpoint and ends where the uninterrupted run does."""
    import signal
    import subprocess
    import sys
    import time

    tier_path, checkpoint, marker = tmp_path / "tier", tmp_path / "ckpt.pt", tmp_path / "mid-write"
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, __file__, str(tier_path), str(checkpoint),
                              str(marker)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the torn write"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 9
    net = model(seed=1)
    net.load_state_dict(saved["model"])
    opt = OffloadedOptimizer(MAKERS["galore"](net), tier="disk", path=tier_path, prefetch=1)
    sched = schedule(opt)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    train(net, opt, sched, range(saved["step"], STEPS))
    assert_same_weights(plain_runs["galore"][0], net)
    assert_same_state(plain_runs["galore"][1].state_dict(), opt.state_dict())
    opt.close()


def test_a_nonfinite_gradient_is_refused_in_the_engines_own_sentence():
    sentences = []
    for wrap_it in (False, True):
        net = model()
        opt = MAKERS["frugal"](net)
        opt = OffloadedOptimizer(opt) if wrap_it else opt
        net[0].weight.grad = torch.full_like(net[0].weight, float("nan"))
        with pytest.raises(FloatingPointError) as caught:
            opt.step()
        sentences.append(str(caught.value))
    assert sentences[0] == sentences[1]


# -- a failed write behind, a closed optimizer, what it reports -----------------------------------------


def accumulate(net, step):
    for x in micro_batches(step):
        net(x).pow(2).mean().backward()


def test_a_failed_write_behind_refuses_the_checkpoint_and_the_next_step(tmp_path, monkeypatch):
    """EIO on one write behind: the moments on disk are older than the counters, so the step that meets it
    (or, when the write fails after the step returned, the next state_dict()) raises one sentence naming the
    parameter and its file, and from then on every state_dict() and step() raises it without changing a
    weight. Which of the step's writes fails first depends on the I/O thread, so the sentence is matched
    for any parameter."""
    net, opt, _ = run("galore", "disk", tmp_path / "tier", steps=range(2))
    write_whole, calls = tiers.write_from, []

    def fail_first(fd, tensor, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        write_whole(fd, tensor, offset)

    monkeypatch.setattr(tiers, "write_from", fail_first)
    sentence = r"could not write the state of parameter \d+ to .*state_\d+\.bin.*Input/output error"
    accumulate(net, 2)
    try:
        opt.step()
    except OSError as err:  # met inside the step, when a later parameter's read waited for the writes
        assert re.search(sentence, str(err))
    opt.zero_grad()
    with pytest.raises(OSError, match=sentence):
        opt.state_dict()
    weights = [p.detach().clone() for p in net.parameters()]
    accumulate(net, 3)
    with pytest.raises(OSError, match=sentence):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    with pytest.raises(OSError, match=sentence):
        opt.state_dict()  # still: a second try must not hand out the stale moments either
    opt.close()  # releases the path without raising again
    OffloadedOptimizer(MAKERS["galore"](model()), tier="disk", path=tmp_path / "tier").close()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_a_closed_optimizer_is_one_sentence(tier, tmp_path):
    net, opt, _ = run("galore", tier, tmp_path / "tier", steps=range(1))
    opt.close()
    opt.close()  # a second close does nothing
    accumulate(net, 1)
    for use in (opt.step, opt.state_dict, lambda: opt.load_state_dict({}), opt.state_bytes_by_tier):
        with pytest.raises(RuntimeError, match="this OffloadedOptimizer was closed"):
            use()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("name", ["galore", "galore8bit", "frugal_blocks"])
def test_state_bytes_by_tier_counts_the_state_dict_without_reading_the_tier(name, tier, tmp_path, monkeypatch):
    """The reference is the state dict: its tensors beyond the engine's own state are the tier's."""
    net, opt, _ = run(name, tier, tmp_path / "tier", steps=range(6))  # frugal_blocks: a block without moments
    params = [p for group in opt.param_groups for p in group["params"]]
    in_tier = sum(value.nbytes for index, entry in opt.state_dict()["state"].items() for key, value in entry.items()
                  if key not in opt.state.get(params[index], {}) and torch.is_tensor(value))
    on_device = sum(value.nbytes for entry in opt.state.values() for value in entry.values() if torch.is_tensor(value))

    def no_reads(*args):
        raise AssertionError("state_bytes_by_tier read the state back")

    monkeypatch.setattr(tiers, "read_into", no_reads)
    other = "disk" if tier == "cpu" else "cpu"
    assert opt.state_bytes_by_tier() == {"device": on_device, tier: in_tier, other: 0}
    assert in_tier > 0
    opt.close()


def test_check_finite_is_the_wrapped_optimizers_switch():
    net = model()
    engine = MAKERS["galore"](net)
    opt = OffloadedOptimizer(engine)
    assert opt.check_finite is engine.check_finite is True
    opt.check_finite = False
    assert engine.check_finite is False
    net[2].bias.grad = torch.full_like(net[2].bias, float("nan"))
    opt.step()  # not refused: the switch is off
    assert net[2].bias.isnan().all()
    opt.close()
