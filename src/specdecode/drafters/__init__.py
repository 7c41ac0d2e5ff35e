"""Drafters by method name. A method's drafter is built by ``build_drafter``."""

from __future__ import annotations

from .base import Drafter, VanillaDrafter
from .lookahead import LookaheadDrafter
from .pld import PromptLookupDrafter
from .quant import QuantDrafter
from .recycle import RecycleDrafter, SuffixRecycleDrafter
from .rest import RestDrafter
from .sps import DraftModelDrafter
from .suffix import SuffixDrafter
from .swift import SwiftDrafter

METHODS: dict[str, type[Drafter]] = {
    "vanilla": VanillaDrafter,
    "sps": DraftModelDrafter,
    "pld": PromptLookupDrafter,
    "swift": SwiftDrafter,
    "quant": QuantDrafter,
    # Model-free drafters (no weights of their own): suffix structures, the target's own
    # verification logits, Jacobi iteration, retrieval.
    "suffix": SuffixDrafter,
    "recycle": RecycleDrafter,
    "suffix+recycle": SuffixRecycleDrafter,
    "lookahead": LookaheadDrafter,
    "rest": RestDrafter,
}

__all__ = [
    "METHODS", "Drafter", "DraftModelDrafter", "LookaheadDrafter", "PromptLookupDrafter", "QuantDrafter",
    "RecycleDrafter", "RestDrafter", "SuffixDrafter", "SuffixRecycleDrafter", "SwiftDrafter", "VanillaDrafter",
]  # fmt: skip
