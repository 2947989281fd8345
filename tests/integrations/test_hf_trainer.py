"""scrimp optimizers driven by ``transformers.Trainer`` equal the same optimizer in a plain torch loop.

The reference is a hand-written loop over the same batches in the same order: ``(loss / k).backward()``
per micro-batch, ``step()`` and ``zero_grad()`` per window, the same linear learning-rate decay (a
layer-wise optimizer driven by this loop is the module doc's "step() once per window" loop; that it
equals plain accumulation is tests/optim/test_layerwise.py's business); for a zeroth-order optimizer
it is ``accumulate(closure)`` per micro-batch then ``step()``.
With the Trainer's loss the plain mean (``model_accepts_loss_kwargs = False``), both sides run the same
float32 operations in the same order, so the weights must agree bit for bit: any tolerance would only
hide a missed or doubled step, a wrong learning rate or a lost micro-batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from scrimp.integrations.hf import ScrimpTrainer, build_for_trainer  # noqa: E402
from scrimp.optim import build, param_groups  # noqa: E402

SEQ, BATCH, STEPS, LR = 16, 2, 4, 1e-2


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


def dataset(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def trainer_args(tmp_path, accumulation: int, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=accumulation, learning_rate=LR, lr_scheduler_type="linear",
                  warmup_steps=0, max_grad_norm=0.0, train_sampling_strategy="sequential", report_to="none",
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def reference_weights(model, cfg: dict, data: list[dict], accumulation: int) -> dict:
    """The plain loop: same batches, same order, linear decay of lr to 0 over STEPS (HF's 'linear')."""
    cfg = dict(cfg)
    if "optim_target_modules" in cfg:
        cfg["target_modules"] = cfg.pop("optim_target_modules")
    opt = build(cfg, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (STEPS - s) / STEPS))
    model.train()
    batches = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
    for step in range(STEPS):
        window = batches[step * accumulation:(step + 1) * accumulation]
        for micro in window:
            ids = torch.stack([row["input_ids"] for row in micro])
            labels = torch.stack([row["labels"] for row in micro])
            if getattr(opt, "is_zeroth_order", False):
                with torch.no_grad():
                    opt.accumulate(lambda ids=ids, labels=labels: model(input_ids=ids, labels=labels).loss)
            else:
                (model(input_ids=ids, labels=labels).loss / accumulation).backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    "adamw": ({"name": "adamw", "lr": LR}, 1),
    "adamw8bit": ({"name": "adamw8bit", "lr": LR}, 1),
    "galore-hf-target-spelling-accumulated": (
        {"name": "galore", "lr": LR, "rank": 4, "update_proj_gap": 2, "scale": 0.25,
         "optim_target_modules": ["self_attn", "mlp"]}, 2),
    "galore8bit": ({"name": "galore8bit", "lr": LR, "rank": 4, "update_proj_gap": 2, "scale": 0.25}, 1),
    "frugal": ({"name": "frugal", "lr": LR, "density": 0.25, "update_gap": 2}, 1),
    "galore-layerwise-accumulate-2": (
        {"name": "galore", "lr": LR, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "layerwise": True,
         "accumulate": 2}, 2),
    "adamw-layerwise": ({"name": "adamw", "lr": LR, "layerwise": True}, 1),
    "zo_sgd-accumulated": ({"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, 2),
    "zo_adam": ({"name": "zo_adam", "lr": 1e-3, "eps": 1e-3}, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_steps_equal_the_plain_loop(case, tmp_path):
    cfg, accumulation = CASES[case]
    data = dataset(BATCH * accumulation * STEPS)
    start = tiny_llama()
    model, reference_model = start, copy.deepcopy(start)
    initial = {k: v.detach().clone() for k, v in start.state_dict().items()}

    trainer = ScrimpTrainer(model=model, args=trainer_args(tmp_path, accumulation), train_dataset=data,
                            scrimp_optim=cfg)
    trainer.model_accepts_loss_kwargs = False  # the loss is the plain mean, as in the reference loop
    trainer.train()
    assert trainer.state.global_step == STEPS

    expected = reference_weights(reference_model, cfg, data, accumulation)
    got = model.state_dict()
    moved = [k for k in expected if not torch.equal(expected[k], initial[k])]
    assert moved, "the reference run changed no weight: the comparison would prove nothing"
    mismatched = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not mismatched, f"{case}: weights differ from the plain loop in {mismatched[:5]}"


def test_ready_optimizer_through_plain_trainer_equals_scrimp_trainer(tmp_path):
    """The other documented way in: ``Trainer(optimizers=(opt, None))`` for ordinary optimizers."""
    cfg = {"name": "galore", "lr": LR, "rank": 4, "update_proj_gap": 2, "scale": 0.25}
    data = dataset(BATCH * STEPS)
    a, b = tiny_llama(), tiny_llama()
    plain = transformers.Trainer(model=a, args=trainer_args(tmp_path / "a", 1), train_dataset=data,
                                 optimizers=(build(cfg, a), None))
    ours = ScrimpTrainer(model=b, args=trainer_args(tmp_path / "b", 1), train_dataset=data, scrimp_optim=cfg)
    for trainer in (plain, ours):
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("cfg, overrides, message", [
    ({"name": "galore", "rank": 4, "layerwise": True}, {}, "max_grad_norm=1.0 cannot apply to layer-wise updates"),
    ({"name": "galore", "rank": 4, "layerwise": True, "accumulate": 2}, {"max_grad_norm": 0.0},
     "accumulates 2 micro-batches but gradient_accumulation_steps=1"),
    ({"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, {}, "max_grad_norm=1.0 cannot apply to a zeroth-order"),
    ({"name": "galore", "target_modules": "mlp", "optim_target_modules": "mlp"}, {},
     "both target_modules and optim_target_modules"),
])
def test_settings_the_mode_cannot_honour_are_refused_before_training(cfg, overrides, message, tmp_path):
    args = trainer_args(tmp_path, 1, **{"max_grad_norm": 1.0, **overrides})
    with pytest.raises(ValueError, match=message):
        build_for_trainer(tiny_llama(), cfg, args)


def test_param_groups_accepts_hf_optim_target_modules_spelling():
    model = tiny_llama()
    hf = param_groups(model, optim_target_modules=["self_attn", "mlp"], rank=4)
    ours = param_groups(model, target_modules=["self_attn", "mlp"], rank=4)
    assert [[id(p) for p in g["params"]] for g in hf] == [[id(p) for p in g["params"]] for g in ours]
    assert len(hf[0]["params"]) == 2 * (4 + 3)  # q, k, v, o and gate, up, down in each of 2 layers
    with pytest.raises(ValueError, match="both target_modules and optim_target_modules"):
        param_groups(model, target_modules="mlp", optim_target_modules="mlp")
