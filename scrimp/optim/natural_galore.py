"""Natural GaLore as a thin configuration of the subspace engine (Das, 2024, "Natural GaLore:
Accelerating GaLore for memory-efficient LLM training and fine-tuning", arXiv:2410.16029).

GaLore's projected Adam with the inner rule ``natural`` (``scrimp.optim.rules.natural``): before
Adam, each projected gradient is multiplied by the inverse empirical Fisher (lambda I + G G^T)^{-1}
of the last ``natural_history`` projected gradients, through the Woodbury identity. The parameter
groups are GaLore's (groups with ``rank`` are projected; others are plain AdamW):

    from scrimp.optim import param_groups
    from scrimp.optim.natural_galore import NaturalGaLoreAdamW
    opt = NaturalGaLoreAdamW(param_groups(model, rank=128, update_proj_gap=200, scale=0.25), lr=1e-2)

Defaults are the authors' (github.com/selfsupervised-ai/Natural-GaLore, ``SubSpaceAdamW`` and its
LLaMA-60M script): lr 1e-3, betas (0.9, 0.999), eps 1e-6 added to sqrt(v) (the HF form), history
20, damping 1e-3, gap 200, scale 0.25. Differences, on purpose: the subspace is GaLore's one-sided
SVD basis of the paper's Sec. 3 (the authors' code takes a Tucker decomposition, which for a matrix
projects both sides to an r x r core); weight decay is decoupled and applied before the update (their
code applies it after); refreshes are staggered across parameters (``stagger=True``).
"""

from __future__ import annotations

from collections.abc import Iterable

from .subspace import SubspaceAdamW


class NaturalGaLoreAdamW(SubspaceAdamW):
    """AdamW with GaLore projection and Natural GaLore's inverse-Fisher step on the groups that carry ``rank``.

    ``natural_history`` (s, default 20) is how many projected gradients form the empirical Fisher
    (its state is an s x r x n stack per matrix: s times one Adam moment), ``natural_damping``
    (lambda, default 1e-3) its Tikhonov term. ``projector``, ``sign_rule``, ``moment_policy``
    ("keep", as the authors' code keeps its history across a refresh; "reset"; or "rotate", which
    carries m, v and the history into the new basis) and ``check_finite`` are ``GaLoreAdamW``'s.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        natural_history: int = 20,
        natural_damping: float = 1e-3,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projector: str = "svd",
        stagger: bool = True,
        seed: int = 0,
        sign_rule: str = "align",
        moment_policy: str = "keep",
        eps_style: str = "hf",
        check_finite: bool = True,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_style=eps_style,
            check_finite=check_finite, inner="natural", natural_history=natural_history,
            natural_damping=natural_damping, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            projector=projector, stagger=stagger, seed=seed, sign_rule=sign_rule, moment_policy=moment_policy,
        )
