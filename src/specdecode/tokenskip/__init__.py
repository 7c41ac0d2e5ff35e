"""TokenSkip: controllable chain-of-thought compression (Xia et al., EMNLP 2025), on our engine.

The pipeline (``specdecode tokenskip solve|compress|train|eval``, or ``run`` for the first
three), every step resumable from the files it appends to:

1. ``solve``: the target answers GSM8K train itself (greedy, through our engine, batched and
   speculative: exact); only correct chains of thought of at most 500 tokens are kept.
2. ``compress``: each kept chain of thought is scored token by token (LLMLingua-2's classifier, or
   a local causal LM's self-information) and pruned to each ratio gamma.
3. ``train``: LoRA SFT with peft on ``question <sep> gamma <sep> -> compressed CoT + answer``.
4. ``eval``: GSM8K test at each gamma: accuracy, chain-of-thought tokens, measured ratio, time.

Serving a trained adapter: ``merged_model(base, adapter)`` merges it into the base once (cached)
and returns a folder every backend loads; ``format_user`` / ``tokenskip_prompt`` write the prompt
with a ratio. See docs/tokenskip.md.
"""

from .answers import extract_answer, gold_answer, is_correct
from .data import Problem, load_gsm8k, select
from .merge import merged_model, merge_adapter
from .prompts import INSTRUCTION, SEPARATOR, ANSWER_PREFIX, format_user, sft_output, split_cot, tokenskip_prompt

__all__ = [
    "ANSWER_PREFIX", "INSTRUCTION", "SEPARATOR", "Problem", "extract_answer", "format_user", "gold_answer",
    "is_correct", "load_gsm8k", "merge_adapter", "merged_model", "select", "sft_output", "split_cot",
    "tokenskip_prompt",
]  # fmt: skip
