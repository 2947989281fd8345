"""Writes ``state_compat.pt``: state dicts saved by the engine before it was composed of parts (issue 14).

Run once, at commit 1be3094 (the last commit with the monolithic ``SubspaceAdamW.step_param``), from an
export of that commit::

    git archive 1be3094 | tar -x -C /tmp/baseline
    PYTHONPATH=/tmp/baseline .venv/bin/python tests/optim/data/make_state_compat.py

Each entry holds the weights and the optimizer's ``state_dict()`` after three steps, the gradients
of two more steps, and the weights the old code reached after those two steps, so that
``tests/optim/test_state_compat.py`` can check that the new code continues the old run bitwise.
"""

import copy
from pathlib import Path

import torch

from scrimp.optim import FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW

# name -> (parameter shapes, how many lead the projected group, constructor of the optimizer)
CASES = {
    "galore": (((6, 10), (40, 24), (10,)), 2,
               lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.01), dict(rank=2, update_proj_gap=2)),
    "galore_rotate": (((6, 10), (40, 24), (10,)), 2,
                      lambda g: GaLoreAdamW(g, lr=1e-2, moment_policy="rotate"), dict(rank=3, update_proj_gap=2)),
    # 8-bit moments need 4096 entries or more: the (32, 128) moment and the 4096-vector are quantized,
    # the (10,) vector keeps fp32 moments
    "galore8bit": (((64, 128), (4096,), (10,)), 1,
                   lambda g: GaLoreAdamW8bit(g, lr=1e-2), dict(rank=32, update_proj_gap=2)),
    "frugal_svd": (((6, 10), (40, 24), (10,)), 2,
                   lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="svd"), dict(density=0.25)),
    "frugal_randk": (((6, 10), (40, 24), (10,)), 2,
                     lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="randk"), dict(density=0.25)),
    "frugal_blocks": (((6, 10), (40, 24), (8, 8), (10,)), 3,
                      lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="blocks"), dict(density=0.5)),
    "scaled_columns": (((6, 10), (40, 24), (10,)), 2,
                       lambda g: SubspaceAdamW(g, lr=1e-2), dict(rank=2, projector="columns", residual="scaled",
                                                               update_proj_gap=2)),
}


def params(shapes):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]


def gradients(shapes, step):
    return [torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + i)) for i, shape in enumerate(shapes)]


def run(opt, ps, steps):
    for step in steps:
        for p, g in zip(ps, gradients([p.shape for p in ps], step)):
            p.grad = g
        opt.step()


def main():
    out = {}
    for name, (shapes, split, make, projection) in CASES.items():
        ps = params(shapes)
        opt = make([{"params": ps[:split], **projection}, {"params": ps[split:]}])
        run(opt, ps, range(3))
        # deep-copied: state_dict() shares the per-parameter dicts and tensors that the next steps change
        saved = ([p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()))
        run(opt, ps, range(3, 5))
        out[name] = {"weights": saved[0], "state_dict": saved[1], "expected": [p.detach().clone() for p in ps]}
    torch.save(out, Path(__file__).with_name("state_compat.pt"))


if __name__ == "__main__":
    main()
