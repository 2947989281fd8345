"""GaLore as a thin configuration of the subspace engine (Zhao et al., 2024, arXiv:2403.03507).

Drop-in for ``galore_torch.GaLoreAdamW``: the same parameter-group format,
``{'params': [...], 'rank': 128, 'update_proj_gap': 200, 'scale': 0.25, 'proj_type': 'std'}``;
groups without ``rank`` are plain AdamW.

    from scrimp.optim import GaLoreAdamW, param_groups
    opt = GaLoreAdamW(param_groups(model, rank=128, update_proj_gap=200, scale=0.25), lr=1e-2)

Differences from galore-torch, on purpose: projector refreshes are staggered across parameters
(``stagger=True``; ``False`` refreshes every matrix on the same steps, as the original), weight
decay is decoupled and applied before the update (torch AdamW order; galore-torch applies it
after), the state dict holds only tensors and numbers, and a failed SVD falls back with a warning.
"""

from __future__ import annotations

from collections.abc import Iterable

from .subspace import SubspaceAdamW


class GaLoreAdamW(SubspaceAdamW):
    """AdamW with GaLore gradient low-rank projection on the groups that carry ``rank``.

    Defaults follow galore-torch (lr 1e-3, betas (0.9, 0.999), eps 1e-6, no weight decay; group
    defaults update_proj_gap 200, scale 0.25, proj_type "std"). ``projector`` picks svd (default),
    gram (the same subspace from eigh of the fp32 Gram matrix: faster refreshes), rsvd or random; ``fused`` selects the Triton kernels (None: on CUDA when triton imports).
    ``check_finite`` (default True): ``step()`` raises before any change when a gradient holds inf or NaN.
    ``sign_rule`` ("align", "canonical" or "solver") fixes the signs of spectral bases so that a run
    does not depend on the machine's LAPACK/cuSOLVER (``projection.orient_basis``); "solver" keeps the
    solver's signs, which is galore-torch's behaviour, for exact parity with it on one machine.
    ``moment_policy`` says how the moments cross a refresh: "keep" (galore-torch), "reset" or
    "rotate" into the new basis (``functional.rotate_moments_``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projector: str = "svd",
        stagger: bool = True,
        seed: int = 0,
        sign_rule: str = "align",
        moment_policy: str = "keep",
        eps_style: str = "hf",
        fused: bool | None = None,
        check_finite: bool = True,
        no_deprecation_warning: bool = True,
        _moments_8bit: bool = False,
    ):
        if correct_bias is not True:
            raise ValueError("correct_bias must be True: GaLoreAdamW always applies Adam's bias correction")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_style=eps_style, fused=fused,
            moments_8bit=_moments_8bit, check_finite=check_finite,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector=projector,
            stagger=stagger, seed=seed, sign_rule=sign_rule,
            moment_policy=moment_policy,
        )


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with 8-bit blockwise-quantized moments (bitsandbytes; works on CPU).

    Follows galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes' Adam8bit on the projected gradient)
    with bitsandbytes' dynamic blockwise quantization (Dettmers et al., 2022) of both moments;
    tensors under 4096 elements keep fp32 moments, as bitsandbytes does. Its defaults are that
    class's: eps 1e-8, weight decay 0.01, and bitsandbytes' Adam, which adds eps to the
    bias-corrected sqrt(v) (``eps_style="torch"``; ``GaLoreAdamW`` keeps galore-torch's HF formula).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, eps_style: str = "torch", **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_style=eps_style,
                         _moments_8bit=True, **kwargs)
