"""What the steps share: loading an engine (an adapter merged at load), generating many prompts
(batched when the method allows it), a run's settings file, and progress bars."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import checks as opt
from ..errors import InvalidArgument


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, unit="it", dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)  # fmt: skip


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    opt.integer("threads", threads)
    import torch

    torch.set_num_threads(threads)


def load_engine(model: str, method: str = "vanilla", *, adapter: str | None = None, dtype: str = "auto",
                device: str = "cpu", options: dict | None = None, progress: bool = True):  # fmt: skip
    """An engine for ``model`` (folder or known name), with ``adapter`` merged into it first."""
    from ..engine import Engine

    path = model
    if adapter is not None:
        from .merge import merged_model

        path = str(merged_model(model, adapter, progress=progress))
    return Engine.from_pretrained(path, method, dtype=dtype, device=device, progress=progress, **(options or {}))


def check_positive(name: str, value: Any) -> int:
    return opt.integer(name, value)


class Generator:
    """Generates for lists of prompt ids with one engine: ``generate_batch`` (continuous
    batching) when ``max_num_seqs`` > 1 and the method batches, else one prompt at a time.
    Either way each answer is what plain ``generate`` gives it alone (exactness of our
    methods and of batching), so the choice changes speed only."""

    def __init__(self, engine, max_new_tokens: int, max_num_seqs: int = 1):
        self.engine = engine
        self.max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
        self.max_num_seqs = check_positive("max_num_seqs", max_num_seqs)
        self.batched = max_num_seqs > 1
        self.note = ""

    def __call__(self, prompts: list[list[int]]) -> list[tuple[Any, float]]:
        """(result, seconds) per prompt; a batch's wall time is shared equally by its answers."""
        if self.batched:
            t0 = time.perf_counter()
            try:
                results = self.engine.generate_batch(prompts, max_new_tokens=self.max_new_tokens,
                                                     max_num_seqs=self.max_num_seqs)  # fmt: skip
            except InvalidArgument as e:
                if e.argument not in ("method", "backend"):
                    raise
                self.batched = False
                self.note = f"one prompt at a time: {e.message}"
                print(f"note: {self.note}", file=sys.stderr)
            else:
                dt = (time.perf_counter() - t0) / len(prompts)
                return [(r, dt) for r in results]
        out = []
        for ids in prompts:
            t0 = time.perf_counter()
            r = self.engine.generate(ids, max_new_tokens=self.max_new_tokens)
            out.append((r, time.perf_counter() - t0))
        return out


def check_settings(path: Path, settings: dict[str, Any], what: str) -> None:
    """A folder holds one run: a rerun must use the same settings (else its rows would mix)."""
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            k, (was, now) = next(iter(diff.items()))
            raise InvalidArgument(
                "out", f"{str(path.parent)!r} holds a {what} run with {k}={was!r}, not {now!r}: "
                "rerun with the same settings to resume it, or pick another --out"
            )  # fmt: skip
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))


def model_label(model: str) -> str:
    """How a model is named in settings: a known name as it is, a folder by its absolute path."""
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.exists() else str(model)
