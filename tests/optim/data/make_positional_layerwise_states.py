"""Writes ``positional_layerwise_states.pt``: layer-wise states as scrimp wrote them before they were keyed by name.

Run once with the code of commit 1be3094 (the last whose ``LayerwiseOptimizer.state_dict`` keyed
the window by position), from an export of it:
``git archive 1be3094 | tar -x -C /tmp/h5_baseline`` then
``PYTHONPATH=/tmp/h5_baseline .venv/bin/python tests/optim/data/make_positional_layerwise_states.py``;
rerunning it with later code would write name-keyed dicts and no longer test the conversion. Each
entry holds the model's state, the wrapper's ``state_dict()`` taken inside an accumulation window
(6 micro-batches into windows of 4) and ``order``: the parameter names in the wrapper's order,
which is what a position meant.
"""

import sys
from pathlib import Path

import torch

from scrimp.optim import layerwise

# The model, groups, batches and optimizers are test_layerwise.py's (which imports only what 1be3094 has).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_layerwise import FACTORIES, loss_of, micro_batches, model_and_groups  # noqa: E402

SAVED = ("galore", "torch-adamw")


def saved_inside_a_window(name, step_every_backward):
    projection, factory = FACTORIES[name]
    model, groups = model_and_groups(**projection)
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    for j, (x, y) in enumerate(micro_batches(6)):
        loss_of(model, (x, y), 4).backward()
        if step_every_backward or j % 4 == 3:
            opt.step()
            opt.zero_grad()
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in groups for p in g["params"]]
    return {"model": model.state_dict(), "opt": opt.state_dict(), "order": order}


def main():
    out = {f"{name}/{loop}": saved_inside_a_window(name, loop == "step-every-backward")
           for name in SAVED for loop in ("step-every-backward", "step-per-window")}
    torch.save(out, Path(__file__).with_name("positional_layerwise_states.pt"))


if __name__ == "__main__":
    main()
