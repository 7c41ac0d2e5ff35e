"""The engine: a target model, its tokenizer and a drafter, and the decoding loop that joins them.

    propose (drafter) -> verify in one target forward -> accept -> roll back -> repeat

Invariant of the loop: the target's KV cache holds every token of the sequence but the last;
that last token is the root of the next draft and the first token of the next verification
forward. The output is exactly plain decoding's: greedy keeps the longest draft prefix equal to
the target's argmax plus the target's own next token; sampling uses lossless speculative
sampling (``draft.verify_sampling``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends import Backend, load_backend
from .draft import Draft, verify_sampling
from .drafters import METHODS, Drafter, DraftModelDrafter, VanillaDrafter
from .errors import InvalidArgument, ModelLoadError
from .hub import resolve_model
from .sampling import SamplingParams
from .verification import VerifyRule

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> the model's own dtype; else a name from DTYPES or a torch dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise InvalidArgument("dtype", f"expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class DraftLength:
    """How many tokens to draft next: fixed, or adaptive (grow by 2 after a fully accepted draft,
    shrink by 1 otherwise, within [1, maximum])."""

    def __init__(self, initial: int, adaptive: bool = False, maximum: int = 16):
        if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
            raise InvalidArgument("draft_length", f"expected an integer >= 0, got {initial!r}")
        self.initial, self.adaptive, self.maximum = initial, adaptive, max(maximum, initial)
        self.current = initial

    def reset(self) -> None:
        self.current = self.initial

    def update(self, accepted: int, proposed: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.current = min(self.current + 2, self.maximum)
        else:
            self.current = max(self.current - 1, 1)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # verification forwards (decoding steps), prefill excluded
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per step
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    method: dict[str, Any] = field(default_factory=dict)
    verify: str = "exact"  # the acceptance rule; anything else is lossy when ``lossy`` says so
    lossy: bool = False

    @property
    def mean_accepted_tokens(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            mean_accepted_tokens=self.mean_accepted_tokens,
            acceptance_rate=self.acceptance_rate,
            tokens_per_second=self.tokens_per_second,
        )
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens (an EOS that ended generation included)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": len(self.prompt_token_ids),
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class GenerationStream:
    """Iterates over text pieces as they are decoded; ``result`` is set once it is exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]


def _check_method(method: str, draft_model) -> None:
    if method not in METHODS:
        raise InvalidArgument("method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "sps" and draft_model is None:
        raise InvalidArgument("draft_model", "method 'sps' needs a draft model (same tokenizer as the target)")
    if method != "sps" and draft_model is not None:
        raise InvalidArgument("draft_model", f"only method 'sps' uses a draft model, not {method!r}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(name, f"expected a positive integer, got {value!r}")
    return value


class Engine:
    def __init__(
        self,
        target: Backend,
        tokenizer,
        drafter: Drafter,
        *,
        draft_length: int | None = None,
        adaptive: bool | None = None,
        max_draft_length: int = 16,
        model_name: str = "model",
        eos_ids: set[int] | None = None,
        verify: VerifyRule | None = None,
    ):
        self.target = target
        self.verify = verify or VerifyRule()
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.model_name = model_name
        self.method = drafter.name
        self.model_path: Path | None = getattr(tokenizer, "name_or_path", None) and Path(tokenizer.name_or_path)
        self.backend_name = target.name
        k = drafter.default_draft_length if draft_length is None else draft_length
        self.draft_length = DraftLength(
            k, drafter.default_adaptive if adaptive is None else adaptive, max_draft_length
        )
        self.eos_ids = self._eos_ids() if eos_ids is None else set(eos_ids)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        method: str = "vanilla",
        *,
        draft_model: str | Path | None = None,
        backend: str = "auto",
        dtype: str | torch.dtype | None = "auto",
        device: str = "cpu",
        draft_length: int | None = None,
        adaptive: bool | None = None,
        max_length: int | None = None,
        progress: bool = True,
        verify: str = "exact",
        **method_options: Any,
    ) -> "Engine":
        """Load a target (folder or known short name) and the drafter for ``method``.

        method_options go to the drafter (pld: max_ngram, min_ngram). ``verify="specdec"`` (with
        beta, tau among the options) is SpecDec's lossy acceptance rule (see verification.py).
        """
        _check_method(method, draft_model)
        torch_dtype = parse_dtype(dtype)
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidArgument("device", f"expected a torch device such as cpu or cuda:0, got {device!r}") from None
        path = resolve_model(str(model), progress=progress)
        tokenizer = load_tokenizer(path)
        target = load_backend(path, backend, dtype=torch_dtype, device=device, max_length=max_length)
        engine = cls(target, tokenizer, VanillaDrafter(), model_name=Path(str(model)).name)
        engine.model_path, engine.backend_name = path, backend
        return engine.with_method(
            method, draft_model=draft_model, draft_length=draft_length, adaptive=adaptive,
            progress=progress, verify=verify, **method_options,
        )  # fmt: skip

    def with_method(
        self,
        method: str,
        *,
        draft_model: str | Path | None = None,
        draft_length: int | None = None,
        adaptive: bool | None = None,
        progress: bool = True,
        verify: str = "exact",
        **method_options: Any,
    ) -> "Engine":
        """A new engine for ``method`` that shares this one's target model (no second copy of
        the weights). Engines sharing a target must not generate at the same time."""
        _check_method(method, draft_model)
        rule = VerifyRule.parse(verify, method_options)
        if getattr(METHODS[method], "uses_tokenizer", False):
            method_options.setdefault("tokenizer", self.tokenizer)  # e.g. to read a corpus
        if method == "sps":
            draft_path = resolve_model(str(draft_model), progress=progress)
            check_same_tokenizer(self.tokenizer, load_tokenizer(draft_path), self.model_path, draft_path)
            draft = load_backend(
                draft_path, self.backend_name, dtype=self.target.dtype, device=self.target.device,
                max_length=self.target.max_length,
            )  # fmt: skip
            build = lambda: DraftModelDrafter(draft, **method_options)  # noqa: E731
        else:
            build = lambda: METHODS[method].create(self.target, **method_options)  # noqa: E731
        try:
            drafter: Drafter = build()
        except TypeError as e:  # an option the method does not take
            raise InvalidArgument("method_options", f"method {method!r}: {e}") from None
        engine = Engine(
            self.target, self.tokenizer, drafter, draft_length=draft_length, adaptive=adaptive,
            model_name=self.model_name, eos_ids=self.eos_ids, verify=rule,
        )  # fmt: skip
        engine.model_path, engine.backend_name = self.model_path, self.backend_name
        return engine

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_cfg = getattr(getattr(self.target, "model", None), "generation_config", None)
        sources = [getattr(self.tokenizer, "eos_token_id", None)]
        path = getattr(self.tokenizer, "name_or_path", None)
        if gen_cfg is None and path:
            try:
                from transformers import GenerationConfig

                gen_cfg = GenerationConfig.from_pretrained(path)
            except Exception:  # noqa: BLE001 - no generation_config.json is fine
                gen_cfg = None
        if gen_cfg is not None:
            sources.append(gen_cfg.eos_token_id)
        for s in sources:
            if isinstance(s, int):
                ids.add(s)
            elif isinstance(s, (list, tuple)):
                ids.update(int(i) for i in s)
        return ids

    # ---- input --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """Prompt text, chat messages (through the chat template) or token ids -> token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("prompt", "expected a non-empty string")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidArgument("messages", f"message {i} needs string 'role' and 'content'")
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidArgument("messages", f"model {self.model_name!r} has no chat template; pass a plain prompt")
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise InvalidArgument("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        else:
            raise InvalidArgument("prompt", "expected a non-empty string, a list of chat messages or a list of token ids")
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidArgument("prompt", "it encodes to no tokens")
        if len(ids) >= self.target.max_length:
            raise InvalidArgument(
                "prompt", f"it has {len(ids)} tokens; the model's context holds {self.target.max_length} in all"
            )
        return ids

    # ---- the decoding loop --------------------------------------------------------------------
    def _sync(self) -> None:
        if self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)

    def _steps(
        self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, stats: GenerationStats
    ) -> Iterator[list[int]]:
        """Yield the tokens each decoding step emits (EOS included, nothing after it)."""
        target, drafter = self.target, self.drafter
        generator = None
        if not params.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        stats.verify, stats.lossy = self.verify.describe(), self.verify.lossy
        target.reset()
        drafter.begin(prompt_ids)
        self.draft_length.reset()
        tokens = list(prompt_ids)
        t0 = time.perf_counter()
        if len(tokens) > 1:
            target.forward(torch.tensor(tokens[:-1]), logits_rows=None)
        self._sync()
        stats.prefill_time = time.perf_counter() - t0
        generated = 0
        while generated < max_new_tokens and target.length < target.max_length:
            start = target.length
            # Room: the verification block (root + nodes) must fit, and no point drafting past the end.
            budget = min(self.draft_length.current, max_new_tokens - generated - 1, target.max_length - start - 1)
            t1 = time.perf_counter()
            draft = drafter.propose(tokens, budget, params, generator) if budget > 0 else Draft()
            draft = draft.head(budget)
            t2 = time.perf_counter()
            block = torch.tensor([tokens[-1]] + draft.tokens)
            if draft.is_chain:
                logits = target.forward(block)
            else:
                positions = torch.tensor([0] + draft.depths()) + start
                logits = target.forward(block, positions=positions, tree_mask=draft.tree_mask())
            if params.greedy:
                path, nxt = self.verify.greedy(draft, logits)
            else:
                path, nxt = verify_sampling(draft, logits, params, generator)
            target.keep(start, [0] + [n + 1 for n in path])
            self._sync()
            t3 = time.perf_counter()
            drafter.observe(tokens[-1], draft, logits)
            new = [draft.tokens[n] for n in path] + [nxt]
            for i, tok in enumerate(new):
                if tok in self.eos_ids:
                    new = new[: i + 1]
                    break
            new = new[: max_new_tokens - generated]
            tokens.extend(new)
            drafter.update(tokens, len(path), draft)
            self.draft_length.update(len(path), len(draft))
            generated += len(new)
            stats.target_forwards += 1
            stats.accept_lengths.append(len(new))
            stats.drafted_tokens += len(draft)
            stats.accepted_draft_tokens += len(path)
            stats.draft_time += (t2 - t1) + (time.perf_counter() - t3)
            stats.verify_time += t3 - t2
            yield new
            if new[-1] in self.eos_ids:
                return

    def _pieces(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        stop: list[str],
        holder: GenerationStream | None,
    ) -> Iterator[str]:
        """Decode steps into text pieces; apply stop strings; build the result at the end."""
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        out: list[int] = []
        emitted = 0  # characters of the text already yielded
        finish = "length"
        text = ""
        t0 = time.perf_counter()
        for new in self._steps(prompt_ids, max_new_tokens, params, stats):
            out.extend(new)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if out[-1] in self.eos_ids:
                finish = "stop"
            hit = _find_stop(text, stop, emitted)
            if hit is not None:
                text = text[:hit]
                out = self._trim_to_stop(out, stop)
                finish = "stop"
            # Hold back an incomplete character and anything that may yet become a stop string.
            safe = len(text) if finish == "stop" and hit is not None else _safe_end(text, stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if hit is not None:
                break
        if emitted < len(text):
            yield text[emitted:]
        stats.new_tokens = len(out)
        stats.total_time = time.perf_counter() - t0
        stats.method = self.drafter.stats()
        result = GenerationResult(text, out, list(prompt_ids), finish, stats)
        if holder is not None:
            holder.result = result

    def _trim_to_stop(self, ids: list[int], stop: list[str]) -> list[int]:
        """The shortest prefix of ``ids`` whose text contains a stop string."""
        while len(ids) > 1 and _find_stop(self.tokenizer.decode(ids[:-1], skip_special_tokens=True), stop, 0) is not None:
            ids = ids[:-1]
        return ids

    def _prepare(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop):
        _check_positive_int("max_new_tokens", max_new_tokens)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if self.verify.lossy and not params.greedy:
            raise InvalidArgument("temperature", f"verify={self.verify.describe()} is a greedy acceptance rule; use temperature 0")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument("stop", f"expected a non-empty string or a list of them, got {stop!r}")
        return self.encode(prompt), params, list(stop)

    def stream(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationStream:
        """Like ``generate`` but yields text pieces; the result is on ``.result`` at the end.

        Arguments are checked now, before the first piece is asked for.
        """
        ids, params, stops = self._prepare(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop)
        holder = GenerationStream(iter(()))
        holder._pieces = self._pieces(ids, max_new_tokens, params, stops, holder)
        return holder

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text, chat messages, or token ids)."""
        s = self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop)
        for _ in s:
            pass
        assert s.result is not None
        return s.result


def _find_stop(text: str, stop: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in ``text`` not before what may already be out."""
    best = None
    for s in stop:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _safe_end(text: str, stop: list[str]) -> int:
    """How much of ``text`` can go out: not a trailing incomplete character (decoded as U+FFFD),
    nor a tail that a later token could complete into a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    held = end
    for s in stop:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:n], 0, end):
                held = min(held, end - n)
                break
    return held


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None


def check_same_tokenizer(target_tok, draft_tok, target_path: Path, draft_path: Path) -> None:
    """A draft model must speak the target's tokens: same vocabulary, same ids."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise InvalidArgument(
            "draft_model",
            f"the tokenizer of {str(draft_path)!r} differs from the target's ({str(target_path)!r}): "
            "a draft model must share the target's vocabulary",
        )
