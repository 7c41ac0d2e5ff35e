"""Drafters by method name: ``registry.py`` lists every method with what it needs."""

from __future__ import annotations

from .base import Drafter, VanillaDrafter
from .lookahead import LookaheadDrafter
from .pld import PromptLookupDrafter
from .quant import QuantDrafter
from .recycle import RecycleDrafter, SuffixRecycleDrafter
from .registry import REGISTRY, Method
from .rest import RestDrafter
from .sps import DraftModelDrafter
from .suffix import SuffixDrafter
from .swift import SwiftDrafter

# Method name -> drafter class, in registration order (what the benchmark's "ours" runs).
METHODS: dict[str, type[Drafter]] = {name: m.drafter for name, m in REGISTRY.items()}

__all__ = [
    "METHODS", "REGISTRY", "Drafter", "DraftModelDrafter", "LookaheadDrafter", "Method", "PromptLookupDrafter",
    "QuantDrafter", "RecycleDrafter", "RestDrafter", "SuffixDrafter", "SuffixRecycleDrafter", "SwiftDrafter",
    "VanillaDrafter",
]  # fmt: skip
