"""Writes ``untagged_states.pt``: optimizer state dicts as scrimp wrote them before they carried a class tag.

Run once, at commit 19dfa67 (before ``scrimp.optim.state_check`` existed), with
``.venv/bin/python tests/optim/data/make_untagged_states.py``; rerunning it with later code would
write tagged dicts and no longer test the inference from keys. Each entry holds the parameters the
state belongs to and the optimizer's ``state_dict()`` after three steps, so that the test can build
the same optimizer around the same shapes and load it.
"""

from pathlib import Path

import torch

from scrimp.optim import ZOSGD, FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, ZOAdam


def params(shapes=((6, 10), (40, 24), (10,))):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]


def groups(ps, split=2, **projection):
    return [{"params": ps[:split], **projection}, {"params": ps[split:]}]


def first_order(opt, ps):
    for step in range(3):
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    return opt.state_dict()


def zeroth_order(opt, ps):
    for _ in range(3):
        opt.step(lambda: sum((p**2).sum() for p in ps))
    return opt.state_dict()


def main():
    out = {}
    ps = params()
    out["galore"] = (ps, first_order(GaLoreAdamW(groups(ps, rank=2), update_proj_gap=2), ps))
    # 8-bit moments need 4096 elements or more (smaller ones stay fp32): a (32, 128) moment and a 4096-vector
    ps = params(((64, 128), (4096,)))
    out["galore8bit"] = (ps, first_order(GaLoreAdamW8bit(groups(ps, split=1, rank=32), update_proj_gap=2), ps))
    ps = params()
    out["frugal"] = (ps, first_order(FrugalAdamW(groups(ps, density=0.25), update_gap=2, proj_type="svd"), ps))
    ps = params()
    out["frugal_randk"] = (ps, first_order(FrugalAdamW(groups(ps, density=0.25), update_gap=2), ps))
    ps = params(((6, 10), (40, 24), (8, 8), (10,)))
    out["frugal_blocks"] = (ps, first_order(FrugalAdamW(groups(ps, split=3, density=0.5), update_gap=2,
                                                        proj_type="blocks"), ps))
    ps = params()
    out["adamw"] = (ps, first_order(torch.optim.AdamW(ps), ps))
    ps = params()
    out["zosgd"] = (ps, zeroth_order(ZOSGD(ps, momentum=0.5, perturbation="inplace"), ps))
    ps = params()
    out["zoadam"] = (ps, zeroth_order(ZOAdam(ps, perturbation="inplace"), ps))
    torch.save(out, Path(__file__).with_name("untagged_states.pt"))


if __name__ == "__main__":
    main()
