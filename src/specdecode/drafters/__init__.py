"""Drafters by method name. A method's drafter is built by ``build_drafter``."""

from __future__ import annotations

from .base import Drafter, VanillaDrafter
from .pld import PromptLookupDrafter
from .quant import QuantDrafter
from .sps import DraftModelDrafter
from .swift import SwiftDrafter

METHODS: dict[str, type[Drafter]] = {
    "vanilla": VanillaDrafter,
    "sps": DraftModelDrafter,
    "pld": PromptLookupDrafter,
    "swift": SwiftDrafter,
    "quant": QuantDrafter,
}

__all__ = ["METHODS", "Drafter", "DraftModelDrafter", "PromptLookupDrafter", "QuantDrafter", "SwiftDrafter", "VanillaDrafter"]
