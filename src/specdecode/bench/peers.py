"""The peers: transformers' own ``generate``, plain (hf-vanilla), with prompt lookup (hf-pld)
and with an assistant model (hf-assisted), on the same prompt ids and settings as ours.

``generate`` does not report decoding steps, so a forward pre-hook on the target watches each
call: how many tokens it is fed and how many its KV cache already holds. One target forward is
one decoding step. Before step i the sequence holds s_i tokens (the prompt length for the first
step, cache length + 1 after it, since the last accepted token is not yet cached); the step
emitted s_{i+1} - s_i tokens, and it verified ``fed - (s_i - cached)`` drafted tokens. For
hf-vanilla this gives one token per step and no drafts, as it should.
"""

from __future__ import annotations

import time

from contextlib import contextmanager

import torch

from ..errors import ModelLoadError
from .methods import TurnOutput


def load_hf_model(path, dtype: torch.dtype, device: torch.device, progress: bool = True):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    if not progress:
        logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"transformers cannot load a causal LM from {str(path)!r}: {e}") from None
    finally:
        if not progress:
            logging.enable_progress_bar()
    return model.to(device).eval()


@contextmanager
def _quiet_transformers():
    """generate() warns about things we do on purpose (an explicit GenerationConfig, ...)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class _StepRecorder:
    """Forward pre-hook: (tokens fed, tokens already cached) for each target forward."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.times: list[float] = []  # when each forward started

    def __call__(self, module, args, kwargs):
        self.times.append(time.perf_counter())
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        cached = int(cache.get_seq_length()) if cache is not None else 0
        self.calls.append((int(ids.shape[-1]), cached))

    def steps(self, prompt_len: int, new_tokens: int) -> tuple[list[int], int]:
        """Accept length of each step, and the drafted tokens all steps verified."""
        starts = [prompt_len] + [cached + 1 for _, cached in self.calls[1:]] + [prompt_len + new_tokens]
        accept = [b - a for a, b in zip(starts, starts[1:])]
        drafted = sum(fed - (start - cached) for (fed, cached), start in zip(self.calls, starts))
        return accept, drafted


class HFPeer:
    def __init__(self, name: str, options: dict, model, *, eos_ids, pad_id: int | None, max_length: int, assistant=None):
        self.name, self.options, self.model, self.assistant = name, dict(options), model, assistant
        self.eos_ids = sorted(eos_ids)
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else None)
        self.max_length = max_length

    def _config(self, max_new_tokens: int, temperature: float):
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        # Everything explicit, so that a model's generation_config.json (repetition penalty,
        # sampling defaults) cannot make the peers decode differently from ours.
        return GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            use_cache=True, **sampling, **self.options,
        )  # fmt: skip

    @torch.inference_mode()
    def run_turn(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int | None) -> TurnOutput:
        # Our engine stops when the context is full; stop the peer at the same place.
        max_new_tokens = max(1, min(max_new_tokens, self.max_length + 1 - len(prompt_ids)))
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt_ids], device=device)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        if temperature > 0 and seed is not None:
            torch.manual_seed(seed)
        recorder = _StepRecorder()
        handle = self.model.register_forward_pre_hook(recorder, with_kwargs=True)
        start = time.perf_counter()
        try:
            with _quiet_transformers():
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=self._config(max_new_tokens, temperature), **extra
                )
        finally:
            handle.remove()
        new = out[0, len(prompt_ids) :].tolist()
        accept, drafted = recorder.steps(len(prompt_ids), len(new))
        accepted = sum(accept) - len(accept)  # every step emits one token of the target's own
        # The prefill forward emits the first token; the second forward starts once it is out.
        first = recorder.times[1] - start if len(recorder.times) > 1 else None
        return TurnOutput(new, len(accept), accept, drafted, accepted, first)
