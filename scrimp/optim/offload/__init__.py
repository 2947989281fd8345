"""Offload: optimizer state in host memory or on disk (``OffloadedOptimizer``, ``tiers``) and ZO2-style
parameter streaming for zeroth-order fine-tuning (``stream``)."""

from .optimizer import OffloadedOptimizer
from .tiers import BufferPool, CpuTier, DiskTier, StateTier, make_tier

__all__ = ["BufferPool", "CpuTier", "DiskTier", "OffloadedOptimizer", "StateTier", "make_tier"]
