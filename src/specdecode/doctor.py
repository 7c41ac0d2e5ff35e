"""``specdecode doctor``: is greedy speculation bit-exact on this machine, and what does it cost?

Three parts, from cheap to conclusive:
1. The machine: CPU model and instruction-set flags (or the GPU), torch and oneDNN versions.
2. The load-time row-invariance check of every linear role of a model (``invariance.py``): how
   many rows each kernel keeps invariant, the padding and chunking chosen to make it exact, and
   what that choice costs a verification forward.
3. The evidence: a few prompts decoded with plain decoding and with prompt lookup, compared
   token for token. Greedy speculation is called exact here only when every check passed and
   every output is identical.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch

from .backends import invariance


def machine() -> dict[str, Any]:
    info = {
        "cpu": invariance.cpu_model(),
        "isa_flags": invariance.cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onednn": invariance.onednn_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def default_prompts() -> list[str]:
    text = resources.files("specdecode").joinpath("data/default_questions.jsonl").read_text()
    return [json.loads(line)["turns"][0] for line in text.splitlines() if line.strip()]


@dataclass
class Evidence:
    prompts: int = 0
    equal: int = 0
    accepted_draft_tokens: int = 0
    differing: list[dict] = field(default_factory=list)  # {"prompt": i, "first_difference": j}


def _time_forward(target, context: int, block: int, repeats: int = 5) -> float:
    """Median seconds of one forward of ``block`` tokens after ``context`` cached ones."""
    ids = torch.arange(context + block) % target.vocab_size
    times = []
    for _ in range(repeats):
        target.reset()
        target.forward(ids[:context], logits_rows=None)
        t = time.perf_counter()
        target.forward(ids[context:])
        times.append(time.perf_counter() - t)
    target.reset()
    return sorted(times)[len(times) // 2]


def exactness_cost(target, block: int = 9, context: int = 128) -> dict[str, float] | None:
    """What the padding and chunking cost: a verification forward (``block`` tokens) and a
    decoding step with the exact plan, against the same forwards with every linear left whole."""
    linears = [lin for ls in target.linears().values() for lin in ls] if hasattr(target, "linears") else []
    if not linears or all(lin.pad_rows == 1 and lin.max_rows >= invariance.ROWWISE_MAX_BLOCK for lin in linears):
        return None  # nothing is padded or cut: exactness costs nothing here
    context = min(context, target.max_length - block - 1)
    exact = {"verify": _time_forward(target, context, block), "decode": _time_forward(target, context, 1)}
    plans = [(lin.pad_rows, lin.max_rows) for lin in linears]
    try:
        for lin in linears:
            lin.pad_rows, lin.max_rows = 1, invariance.ROWWISE_MAX_BLOCK
        whole = {"verify": _time_forward(target, context, block), "decode": _time_forward(target, context, 1)}
    finally:
        for lin, (pad, chunk) in zip(linears, plans):
            lin.pad_rows, lin.max_rows = pad, chunk
    return {
        "block": block,
        "verify_exact_s": exact["verify"], "verify_whole_s": whole["verify"],
        "decode_exact_s": exact["decode"], "decode_whole_s": whole["decode"],
    }  # fmt: skip


def evidence(engine, prompts: list[str], max_new_tokens: int, method: str = "pld") -> Evidence:
    fast = engine.with_method(method)
    found = Evidence()
    for i, prompt in enumerate(prompts):
        request = [{"role": "user", "content": prompt}] if getattr(engine.tokenizer, "chat_template", None) else prompt
        plain = engine.generate(request, max_new_tokens=max_new_tokens)
        spec = fast.generate(request, max_new_tokens=max_new_tokens)
        found.prompts += 1
        found.accepted_draft_tokens += spec.stats.accepted_draft_tokens
        if spec.token_ids == plain.token_ids:
            found.equal += 1
        else:
            first = next((j for j, (a, b) in enumerate(zip(spec.token_ids, plain.token_ids)) if a != b),
                         min(len(spec.token_ids), len(plain.token_ids)))  # fmt: skip
            found.differing.append({"prompt": i, "first_difference": first})
    return found


def run_doctor(
    model: str = "smollm2-135m",
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    prompts: int = 6,
    max_new_tokens: int = 64,
    method: str = "pld",
    progress: bool = True,
) -> dict[str, Any]:
    from .engine import Engine

    report: dict[str, Any] = {"machine": machine()}
    engine = Engine.from_pretrained(model, "vanilla", dtype=dtype, device=device, progress=progress)
    target = engine.target
    report["model"] = {"name": model, "backend": target.name, "dtype": str(target.dtype).removeprefix("torch."),
                       "device": str(target.device)}  # fmt: skip
    report["drafters"] = trained_drafters(engine.model_name)
    checks = getattr(target, "row_checks", None)
    report["row_checks"] = [asdict(c) | {"reason": c.reason} for c in checks] if checks else None
    report["exactness_cost"] = exactness_cost(target)
    chosen = default_prompts()[:prompts]
    found = evidence(engine, chosen, max_new_tokens, method)
    report["evidence"] = asdict(found) | {"method": method, "max_new_tokens": max_new_tokens}
    kernels_ok = checks is not None and all(c.exact for c in checks)
    report["bit_exact"] = bool(kernels_ok and found.equal == found.prompts)
    if checks is None:
        report["verdict"] = (f"backend {target.name!r} has no row-invariance check: speculation is exact up to "
                             "rounding only")  # fmt: skip
    elif not kernels_ok:
        report["verdict"] = "not bit-exact: some kernels are not row-invariant in this dtype (exact up to rounding)"
    elif found.equal < found.prompts:
        report["verdict"] = (f"NOT bit-exact here: {method} differed from plain decoding on "
                             f"{found.prompts - found.equal} of {found.prompts} prompts")  # fmt: skip
    else:
        report["verdict"] = (f"greedy speculation is bit-exact here: {method} equal to plain decoding on "
                             f"{found.equal}/{found.prompts} prompts, {found.accepted_draft_tokens} draft tokens accepted")  # fmt: skip
    return report


def trained_drafters(model_name: str) -> list[dict[str, Any]]:
    """The heads cached for this model (``specdecode train-drafter``): kind, folder, bytes and
    what their training reported."""
    import json

    from .heads.store import list_cached

    out = []
    for model, kind, folder in list_cached():
        if model != model_name:
            continue
        config = json.loads((folder / "config.json").read_text()).get("specdecode", {})
        report = folder / "report.json"
        acc = json.loads(report.read_text()).get("mean_accepted_tokens") if report.is_file() else None
        out.append({"kind": kind, "folder": str(folder), "bytes": sum(f.stat().st_size for f in folder.glob("model.safetensors")),
                    "draft_vocab": config.get("draft_vocab_size"), "held_out_mean_accepted_tokens": acc})  # fmt: skip
    return out


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "machine",
        f"  cpu          {m['cpu']} ({m['cores']} cores, torch threads {m['threads']})",
        f"  isa flags    {' '.join(m['isa_flags']) or '?'} (torch kernels: {m['torch_cpu_capability']})",
        f"  libraries    torch {m['torch']}, {m['onednn']}, transformers {m.get('transformers', '?')}",
    ]
    if m.get("gpu"):
        lines.append(f"  gpu          {m['gpu']}")
    md = report["model"]
    lines += ["", f"model {md['name']} ({md['backend']} backend, {md['dtype']}, {md['device']})"]
    if report["row_checks"] is None:
        lines.append("  no row-invariance check on this backend")
    else:
        lines.append(f"  {'linear':<18} {'shape':<14} {'kernel':<14} {'invariant':>9} {'pad':>4} {'chunk':>6}  result")
        for c in report["row_checks"]:
            shape = "x".join(map(str, c["shape"]))
            lines.append(f"  {c['name']:<18} {shape:<14} {c['kernel']:<14} {c['invariant_rows']:>9} {c['pad_rows']:>4} "
                         f"{c['chunk_rows']:>6}  {c['reason']}{' (cached)' if c['cached'] else ''}")  # fmt: skip
    for d in report.get("drafters") or []:
        lines.append(f"  trained drafter: {d['kind']} head, {d['bytes'] / 2**20:.1f} MiB, draft vocabulary {d['draft_vocab']}, "
                     f"held-out mean accepted tokens {d['held_out_mean_accepted_tokens']} ({d['folder']})")  # fmt: skip
    cost = report["exactness_cost"]
    if cost:
        lines.append(
            f"  cost of exactness: a {cost['block']}-token verification {cost['verify_exact_s'] * 1e3:.1f} ms "
            f"(whole: {cost['verify_whole_s'] * 1e3:.1f} ms), a decoding step {cost['decode_exact_s'] * 1e3:.1f} ms "
            f"(whole: {cost['decode_whole_s'] * 1e3:.1f} ms)"
        )
    elif report["row_checks"] is not None:
        lines.append("  cost of exactness: none (every kernel is row-invariant as it is)")
    ev = report["evidence"]
    lines += ["", f"evidence: {ev['method']} vs plain greedy decoding, {ev['prompts']} prompts x {ev['max_new_tokens']} tokens",
              f"  identical {ev['equal']}/{ev['prompts']}, draft tokens accepted {ev['accepted_draft_tokens']}"]  # fmt: skip
    for d in ev["differing"]:
        lines.append(f"  prompt {d['prompt']}: first difference at token {d['first_difference']}")
    lines += ["", f"verdict: {report['verdict']}"]
    return "\n".join(lines)
