"""Moment stores: where an inner rule's state tensors live, and in which number format.

An inner rule declares its state as ``MomentSpec``s (``rules.base``); a store creates, opens and
closes those tensors in a parameter's state dict. The rule always computes on fp32 tensors; the
store decides how they are kept:

- ``Fp32Store``: fp32 tensors under the spec's name (``exp_avg``, ``exp_avg_sq``); ``open`` returns
  the state's own tensors and ``close`` has nothing to do.
- ``Blockwise8bitStore``: bitsandbytes' blockwise dynamic 8-bit quantization (Dettmers et al., 2022,
  "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861): a uint8 code per entry under
  ``<name>_q`` and one fp32 absmax per ``BLOCKSIZE_8BIT`` entries under ``<name>_absmax``, the signed
  code map for signed specs. Tensors under ``MIN_8BIT_NUMEL`` entries (bitsandbytes'
  ``min_8bit_size``) and specs with ``quantizable=False`` stay fp32 under their plain name.

The key names are those of the engine before it had stores, so older state dicts load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .rules.base import MomentSpec

MIN_8BIT_NUMEL = 4096  # as bitsandbytes' min_8bit_size: tiny tensors keep fp32 moments
BLOCKSIZE_8BIT = 256
FP32, BLOCKWISE_8BIT = "fp32", "blockwise8"

_CODES: dict[tuple[bool, str], Tensor] = {}


def _code(signed: bool, device: torch.device) -> Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        import bitsandbytes.functional as bnbf

        _CODES[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize_moment_(x: Tensor, q: Tensor, absmax: Tensor, *, signed: bool) -> None:
    """Blockwise 8-bit quantization of fp32 ``x`` into the state tensors ``q`` (uint8) and ``absmax``."""
    import bitsandbytes.functional as bnbf

    bnbf.quantize_blockwise(x, code=_code(signed, x.device), absmax=absmax, out=q, blocksize=BLOCKSIZE_8BIT)


def dequantize_moment(q: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """fp32 values of a blockwise-quantized moment."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(q, absmax=absmax, code=_code(signed, q.device), blocksize=BLOCKSIZE_8BIT)


def spec_shape(spec: MomentSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one spec's tensor for a projected gradient of ``shape`` (a stack for ``history``)."""
    return (spec.history, *shape) if spec.history else tuple(shape)


def stored_keys(spec: MomentSpec) -> tuple[str, str, str]:
    """Every state key a store may keep ``spec`` under: fp32 by name, or 8-bit codes and their absmax."""
    return spec.name, f"{spec.name}_q", f"{spec.name}_absmax"


def absmax_blocks(numel: int) -> int:
    """How many absmax entries a blockwise-quantized tensor of ``numel`` entries keeps."""
    return -(-numel // BLOCKSIZE_8BIT)


class Fp32Store:
    """Moments as fp32 tensors under their spec names."""

    name = FP32

    def quantizes(self, spec: MomentSpec, shape: tuple[int, ...]) -> bool:
        return False

    def zeros(self, state: dict, specs: Sequence[MomentSpec], shape: tuple[int, ...], device: torch.device) -> None:
        for spec in specs:
            state[spec.name] = torch.zeros(spec_shape(spec, shape), dtype=torch.float32, device=device)

    def has(self, state: dict, specs: Sequence[MomentSpec]) -> bool:
        return bool(specs) and (specs[0].name in state or f"{specs[0].name}_q" in state)

    def format_of(self, state: dict, specs: Sequence[MomentSpec]) -> str:
        """``"blockwise8"`` if any of these moments is held quantized in ``state``, else ``"fp32"``."""
        return BLOCKWISE_8BIT if any(f"{spec.name}_q" in state for spec in specs) else FP32

    def holds_fp32(self, state: dict, specs: Sequence[MomentSpec]) -> bool:
        """Whether every one of these moments is an fp32 tensor under its own name (foreach ops can take it)."""
        return self.format_of(state, specs) == FP32

    def open(self, state: dict, specs: Sequence[MomentSpec]) -> dict[str, Tensor]:
        """fp32 tensors of the moments: the state's own, or dequantized copies that ``close`` writes back."""
        opened = {}
        for spec in specs:
            if spec.name in state:
                opened[spec.name] = state[spec.name]
            else:
                opened[spec.name] = dequantize_moment(state[f"{spec.name}_q"], state[f"{spec.name}_absmax"],
                                                      signed=spec.signed)
        return opened

    def close(self, state: dict, specs: Sequence[MomentSpec], opened: dict[str, Tensor]) -> None:
        """Write opened copies back into their quantized form (fp32 moments were changed in place)."""
        for spec in specs:
            if f"{spec.name}_q" in state:
                quantize_moment_(opened[spec.name], state[f"{spec.name}_q"], state[f"{spec.name}_absmax"],
                                 signed=spec.signed)

    def drop(self, state: dict, specs: Sequence[MomentSpec]) -> None:
        for spec in specs:
            for key in stored_keys(spec):
                state.pop(key, None)

    def expected_shapes(self, specs: Sequence[MomentSpec], shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The state keys ``zeros`` creates for a projected gradient of ``shape``, with their shapes."""
        out = {}
        for spec in specs:
            full = spec_shape(spec, shape)
            if self.quantizes(spec, full):
                out[f"{spec.name}_q"] = full
                out[f"{spec.name}_absmax"] = (absmax_blocks(math.prod(full)),)
            else:
                out[spec.name] = full
        return out


class Blockwise8bitStore(Fp32Store):
    """Moments of ``MIN_8BIT_NUMEL`` entries or more blockwise-quantized to 8 bits (bitsandbytes, CPU too)."""

    name = BLOCKWISE_8BIT

    def quantizes(self, spec: MomentSpec, shape: tuple[int, ...]) -> bool:
        return spec.quantizable and math.prod(shape) >= MIN_8BIT_NUMEL

    def zeros(self, state: dict, specs: Sequence[MomentSpec], shape: tuple[int, ...], device: torch.device) -> None:
        for spec in specs:
            full = spec_shape(spec, shape)
            if not self.quantizes(spec, full):
                state[spec.name] = torch.zeros(full, dtype=torch.float32, device=device)
                continue
            # code 127 of the signed map and 0 of the unsigned map are the value 0 with absmax 0 anyway
            state[f"{spec.name}_q"] = torch.zeros(full, dtype=torch.uint8, device=device)
            state[f"{spec.name}_absmax"] = torch.zeros(absmax_blocks(math.prod(full)), dtype=torch.float32,
                                                       device=device)


FP32_STORE = Fp32Store()
BLOCKWISE_8BIT_STORE = Blockwise8bitStore()


def moment_store(eight_bit: bool) -> Fp32Store:
    """The store of an engine with ``moments_8bit=eight_bit``."""
    return BLOCKWISE_8BIT_STORE if eight_bit else FP32_STORE
