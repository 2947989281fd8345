"""Seeded perturbations for zeroth-order optimization, and the three ways to apply them.

The perturbation of parameter ``i`` for a query seed ``s`` is ``z = randn(shape)`` drawn from a
``torch.Generator`` seeded with ``mix_seed(s, i)``. Keying the generator by (seed, parameter index)
rather than drawing all parameters from one stream (MeZO, Malladi et al. 2023,
princeton-nlp/MeZO) lets any single parameter regenerate its ``z`` alone, in any order: that is
what the streamed path (``scrimp.optim.offload.stream``) needs to update a block as it passes.

Ways to evaluate the loss at ``theta + scale * z``:

- ``hook_perturbation`` (default, exact): global module forward hooks swap in the perturbed weight
  of one module while that module runs, and put the stored parameter back right after. The stored
  parameter is never written, so restoring is bit-exact by construction; extra memory is one
  perturbed copy of the parameters of the module currently running.
- ``inplace_perturb_`` (MeZO's way): ``theta += scale * z`` in place, later ``-2 eps`` and ``+eps``.
  One ``z``-sized buffer, but floating-point rounding makes the round trip inexact.
- ``sliced_perturbation`` (for the dual forward of ZO2, liangyuwang/zo2): the batch is replicated,
  and each leaf module runs every slice with its own (seed, sign) perturbation, so +eps and -eps
  (and several queries) share one pass through the model.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, by chained splitmix64 (Steele et al. 2014) finalizers.

    63 bits so that seeds fit an int64 tensor (checkpoints load with ``weights_only=True``).
    """
    state = _GOLDEN
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + _GOLDEN) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    return generator


def direction(param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The Gaussian perturbation ``z`` of parameter number ``index`` for query ``seed`` (fresh tensor)."""
    generator = _generator(param.device)
    generator.manual_seed(mix_seed(seed, index))
    return torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)


def perturbed_weight(param: torch.Tensor, seed: int, index: int, scale: float) -> torch.Tensor:
    """``param + scale * z`` as a new tensor, computed as ``(z * scale) + param`` in one buffer."""
    return direction(param, seed, index).mul_(scale).add_(param.detach())


def inplace_perturb_(params: Sequence[torch.Tensor], indices: Sequence[int], seed: int, scale: float) -> None:
    """MeZO's in-place perturbation ``theta <- theta + scale * z`` (not exactly reversible in floats)."""
    with torch.no_grad():
        for param, index in zip(params, indices):
            param.add_(direction(param, seed, index), alpha=scale)


def _owned(module: nn.Module, index_of: dict[int, int]) -> list[tuple[str, nn.Parameter, int]]:
    return [
        (name, param, index_of[id(param)])
        for name, param in module._parameters.items()
        if param is not None and id(param) in index_of
    ]


class _Swapper:
    """Swaps perturbed tensors into ``module._parameters`` and puts the originals back, LIFO."""

    def __init__(self, index_of: dict[int, int]):
        self.index_of = index_of
        self.owned_cache: dict[int, list[tuple[str, nn.Parameter, int]]] = {}
        self.stack: list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]] = []
        self.materialized: set[int] = set()

    def owned(self, module: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
        key = id(module)
        if key not in self.owned_cache:
            self.owned_cache[key] = _owned(module, self.index_of)
        return self.owned_cache[key]

    def swap_in(self, module: nn.Module, seed: int, scale: float) -> bool:
        owned = self.owned(module)
        if not owned:
            return False
        originals = []
        for name, param, index in owned:
            module._parameters[name] = perturbed_weight(param, seed, index, scale)
            originals.append((name, param))
            self.materialized.add(index)
        self.stack.append((module, originals))
        return True

    def swap_out(self, module: nn.Module) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] is module:
                _, originals = self.stack.pop(i)
                for name, param in originals:
                    module._parameters[name] = param
                return

    def restore_all(self) -> None:
        while self.stack:
            module, originals = self.stack.pop()
            for name, param in originals:
                module._parameters[name] = param


@contextmanager
def hook_perturbation(index_of: dict[int, int], seed: int, scale: float) -> Iterator[set[int]]:
    """Evaluate modules at ``theta + scale * z(seed)`` one module at a time; stored parameters untouched.

    ``index_of`` maps ``id(param)`` to the parameter's index. Works through *global* module hooks, so
    it needs no reference to the model; a parameter read outside its own module's ``forward`` (e.g.
    a tied weight used directly by the parent) is not perturbed: the yielded set lists the indices
    that were, so callers can warn. Restores everything even if the forward raises.
    """
    swapper = _Swapper(index_of)

    def pre_hook(module, args):
        swapper.swap_in(module, seed, scale)

    def post_hook(module, args, output):
        swapper.swap_out(module)

    pre_handle = register_module_forward_pre_hook(pre_hook)
    post_handle = register_module_forward_hook(post_hook, always_call=True)
    try:
        yield swapper.materialized
    finally:
        pre_handle.remove()
        post_handle.remove()
        swapper.restore_all()


def param_leaf_modules(modules: Iterable[nn.Module], index_of: dict[int, int]) -> list[nn.Module]:
    """Modules that own optimized parameters directly; each must be a leaf for the sliced forward."""
    leaves = []
    for module in modules:
        if not _owned(module, index_of):
            continue
        for child in module.modules():
            if child is not module and _owned(child, index_of):
                raise ValueError(
                    f"module {type(module).__name__} owns optimized parameters and also has a child "
                    f"{type(child).__name__} that does; the sliced (dual) forward needs parameter-owning "
                    "modules to be leaves"
                )
        leaves.append(module)
    return leaves


@contextmanager
def sliced_perturbation(
    leaves: Sequence[nn.Module], index_of: dict[int, int], slices: Sequence[tuple[int, float]]
) -> Iterator[None]:
    """Run a batch replicated ``len(slices)`` times; slice ``j`` sees ``theta + scale_j * z(seed_j)``.

    Each leaf module's ``forward`` is replaced (on the instance, undone on exit) by one that splits
    every tensor argument whose dim 0 equals the first tensor argument's (the replicated batch) into
    equal slices, and runs the original forward once per slice with that slice's perturbed weights
    swapped in. Leaf modules of transformers decoders (Linear, Embedding, norms, OPT's learned
    positions) take batch-first tensors, which is what this needs.
    """
    swapper = _Swapper(index_of)
    n_slices = len(slices)

    def split(value, full: int, j: int):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == full:
            return value.chunk(n_slices, dim=0)[j]
        return value

    def make_forward(module: nn.Module, original):
        def forward(self, *args, **kwargs):
            tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
            if not tensors or tensors[0].shape[0] % n_slices:
                raise ValueError(
                    f"sliced forward of {type(self).__name__}: its first tensor argument must be batch-first "
                    f"with a batch dimension that is a multiple of the {n_slices} perturbation slices"
                )
            full = tensors[0].shape[0]
            outputs = []
            for j, (seed, scale) in enumerate(slices):
                part_args = [split(a, full, j) for a in args]
                part_kwargs = {k: split(v, full, j) for k, v in kwargs.items()}
                swapper.swap_in(self, seed, scale)
                try:
                    outputs.append(original(*part_args, **part_kwargs))
                finally:
                    swapper.swap_out(self)
            if isinstance(outputs[0], torch.Tensor):
                return torch.cat(outputs, dim=0)
            return type(outputs[0])(torch.cat(parts, dim=0) for parts in zip(*outputs))

        return types.MethodType(forward, module)

    patched = []
    try:
        for module in leaves:
            had_instance_forward = "forward" in module.__dict__
            original = module.forward
            module.forward = make_forward(module, original)
            patched.append((module, had_instance_forward, original))
        yield
    finally:
        swapper.restore_all()
        for module, had_instance_forward, original in patched:
            if had_instance_forward:
                module.forward = original
            else:
                del module.forward
