"""``tokenskip eval``: GSM8K test at each ratio gamma, for the base model or an adapter, with
any of our methods.

The subset is fixed: the first ``limit`` problems of the file (default), or, with ``seed``,
``limit`` problems drawn by ``random.Random(seed).sample`` and kept in file order. Greedy,
``max_new_tokens`` 512 (the paper's). Per answer, ``answers-<method>-<gamma>.jsonl`` (keyed by
problem index; a rerun skips what is there) holds the output, its token ids, the chain of
thought's length in tokens (the text before "\\n\\nThe final answer is:"), the extracted answer,
correctness and seconds. Several methods may share one ``--out``: the report then says, per
gamma, how many answers of each method are token-identical to ``vanilla``'s.

Report: ``report.json``, ``report.md`` and ``accuracy_vs_tokens.png`` per gamma and method:
accuracy, mean chain-of-thought tokens, measured ratio (mean CoT tokens at gamma / at gamma 1.0
for the same method), seconds per answer, tokens per second, mean accepted tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InvalidArgument
from .answers import extract_answer, is_correct
from .data import load_gsm8k, select
from .prompts import format_ratio, parse_ratios, read_suffix, split_cot, tokenskip_prompt
from .runs import Generator, check_settings, load_engine, model_label, progress_bar
from .store import JsonlStore, read_rows


def answers_file(out_dir: Path, method: str, ratio: float) -> Path:
    return Path(out_dir) / f"answers-{re.sub(r'[^A-Za-z0-9_.+-]', '_', method)}-{format_ratio(ratio)}.jsonl"


def evaluate(model: str, data: str, out: str, *, ratios: list[float] = (1.0,), adapter: str | None = None,
             method: str = "vanilla", limit: int | None = None, seed: int | None = None, suffix: str | None = None,
             dtype: str = "auto", device: str = "cpu", max_new_tokens: int = 512, max_num_seqs: int = 1,
             chunk: int = 1, options: dict | None = None, progress: bool = True, engine=None,
             only: list[int] | None = None) -> dict:  # fmt: skip
    """``only``: answer and return the report of just these problem indices of the subset (the
    report files are left alone), the rest left for a later call with the same settings
    (Whisper's screening of candidates)."""
    ratios = parse_ratios(list(ratios))
    suffix_text = read_suffix(suffix)
    problems = select(load_gsm8k(data), limit, seed=seed)
    out_dir = Path(out)
    settings = {"model": model_label(model), "adapter": adapter and str(Path(adapter).expanduser().resolve()),
                "data": str(Path(data).expanduser().resolve()), "limit": limit, "seed": seed, "suffix": suffix_text,
                "max_new_tokens": max_new_tokens, "dtype": dtype}  # fmt: skip
    check_settings(out_dir / "eval_settings.json", settings, "eval")
    if only is not None:
        wanted = set(only)
        problems = [p for p in problems if p.index in wanted]
    stores = {g: JsonlStore(answers_file(out_dir, method, g), key="index") for g in ratios}
    todo = {g: [p for p in problems if p.index not in stores[g]] for g in ratios}
    remaining = sum(len(v) for v in todo.values())
    if remaining:
        engine = engine or load_engine(model, method, adapter=adapter, dtype=dtype, device=device, options=options,
                                       progress=progress)  # fmt: skip
        gen = Generator(engine, max_new_tokens, max_num_seqs)
        tok = engine.tokenizer
        # Untimed warm-up: what an engine measures once (its cost curve) is not an answer's time.
        engine.generate(tokenskip_prompt(tok, problems[0].question, ratios[0], suffix_text), max_new_tokens=min(8, max_new_tokens))
        total = len(problems) * len(ratios)
        bar = progress_bar(total, f"eval [{method}]", progress, initial=total - remaining)
        # Rows are written after each call: one answer at a time, or a batch of 4 x max_num_seqs
        # (the scheduler refills its slots as answers finish; only a batch's tail runs part-empty).
        step = 1 if max_num_seqs == 1 else max(chunk, 4 * max_num_seqs)
        for g in ratios:
            bar.set_description(f"eval [{method}] gamma {format_ratio(g)}")
            for start in range(0, len(todo[g]), step):
                part = todo[g][start : start + step]
                prompts = [tokenskip_prompt(tok, p.question, g, suffix_text) for p in part]
                rows = []
                for p, ids, (r, seconds) in zip(part, prompts, gen(prompts)):
                    pred = extract_answer(r.text)
                    s = r.stats
                    rows.append({
                        "index": p.index, "ratio": g, "method": method, "prompt_tokens": len(ids), "output": r.text,
                        "token_ids": list(r.token_ids), "new_tokens": len(r.token_ids),
                        "cot_tokens": len(tok(split_cot(r.text), add_special_tokens=False)["input_ids"]),
                        "prediction": pred, "gold": p.answer, "correct": is_correct(pred, p.answer),
                        "finish_reason": r.finish_reason, "seconds": round(seconds, 5),
                        "mean_accepted_tokens": round(float(getattr(s, "mean_accepted_tokens", 0.0) or 0.0), 4),
                        "target_forwards": int(getattr(s, "target_forwards", 0) or 0),
                    })  # fmt: skip
                stores[g].append(rows)
                bar.update(len(part))
        bar.close()
    return write_report(out_dir, [p.index for p in problems], settings, save=only is None)


def _stats(rows: list[dict]) -> dict:
    n = len(rows)
    seconds = sum(r["seconds"] for r in rows)
    tokens = sum(r["new_tokens"] for r in rows)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "mean_cot_tokens": sum(r["cot_tokens"] for r in rows) / n,
        "mean_new_tokens": tokens / n,
        "seconds_per_answer": seconds / n,
        "wall_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "mean_accepted_tokens": sum(r["mean_accepted_tokens"] for r in rows) / n,
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
    }


def write_report(out_dir: Path, indices: list[int], settings: dict, save: bool = True) -> dict:
    """Report every (method, gamma) answered in ``out_dir`` on the subset ``indices`` (written
    to the report files unless ``save`` is False: a part of the subset is not its report)."""
    out_dir = Path(out_dir)
    wanted = set(indices)
    found: dict[str, dict[float, dict[int, dict]]] = {}
    for f in sorted(out_dir.glob("answers-*.jsonl")):
        for r in read_rows(f):
            if r["index"] in wanted:
                found.setdefault(r["method"], {}).setdefault(float(r["ratio"]), {})[r["index"]] = r
    results = []
    for method, by_ratio in sorted(found.items(), key=lambda kv: (kv[0] != "vanilla", kv[0])):
        base = by_ratio.get(1.0)
        for g in sorted(by_ratio, reverse=True):
            rows = [by_ratio[g][i] for i in sorted(by_ratio[g])]
            entry = {"method": method, "ratio": g, "complete": len(rows) == len(wanted), **_stats(rows)}
            if base:
                common = [i for i in by_ratio[g] if i in base]
                if common:
                    cot_g = sum(by_ratio[g][i]["cot_tokens"] for i in common)
                    cot_1 = sum(base[i]["cot_tokens"] for i in common)
                    entry["measured_ratio"] = cot_g / cot_1 if cot_1 else None
            vanilla = found.get("vanilla", {}).get(g)
            if vanilla and method != "vanilla":
                common = [i for i in by_ratio[g] if i in vanilla]
                entry["identical_to_vanilla"] = sum(by_ratio[g][i]["token_ids"] == vanilla[i]["token_ids"] for i in common)
                entry["compared_with_vanilla"] = len(common)
            results.append(entry)
    report = {"settings": settings, "problems": len(wanted), "results": results}
    if not save:
        return report
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(_markdown(report))
    _plot(results, out_dir / "accuracy_vs_tokens.png")
    return report


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# TokenSkip evaluation (GSM8K)", "",
        f"model `{s['model']}`" + (f", adapter `{s['adapter']}`" if s["adapter"] else " (no adapter)")
        + f"; data `{s['data']}`, {report['problems']} problems"
        + (f" (seeded sample, seed {s['seed']})" if s["seed"] is not None else " (the first of the file)")
        + f"; greedy, {s['max_new_tokens']} new tokens at most" + (f"; suffix {s['suffix']!r}" if s["suffix"] else ""), "",
        "| method | gamma | n | accuracy | mean CoT tokens | measured ratio | s/answer | tok/s | mean accepted | truncated | identical to vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in report["results"]:
        ratio = e.get("measured_ratio")
        ident = f"{e['identical_to_vanilla']}/{e['compared_with_vanilla']}" if "identical_to_vanilla" in e else "-"
        lines.append(
            f"| {e['method']} | {e['ratio']} | {e['n']} | {100 * e['accuracy']:.1f}% | {e['mean_cot_tokens']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {e['seconds_per_answer']:.2f} | {e['tokens_per_second']:.1f} | "
            f"{e['mean_accepted_tokens']:.2f} | {e['truncated']} | {ident} |"
        )
    lines += ["", "measured ratio: mean chain-of-thought tokens at gamma / at gamma 1.0 (same method, same problems).", ""]
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({e["method"] for e in results}):
        pts = sorted((e for e in results if e["method"] == method), key=lambda e: e["mean_cot_tokens"])
        ax.plot([e["mean_cot_tokens"] for e in pts], [100 * e["accuracy"] for e in pts], marker="o", label=method)
        for e in pts:
            ax.annotate(f"{e['ratio']}", (e["mean_cot_tokens"], 100 * e["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("mean chain-of-thought tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("GSM8K: accuracy vs chain-of-thought length (labels: gamma)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_line(report: dict, method: str) -> str:
    parts = []
    for e in report["results"]:
        if e["method"] != method:
            continue
        ratio = e.get("measured_ratio")
        parts.append(f"gamma {e['ratio']}: accuracy {100 * e['accuracy']:.1f}%, mean CoT tokens {e['mean_cot_tokens']:.1f}, "
                     f"ratio {'-' if ratio is None else f'{ratio:.2f}'}, {e['seconds_per_answer']:.2f} s/answer")  # fmt: skip
    return f"tokenskip eval [{method}] {report['problems']} problems | " + " | ".join(parts)


def compare(folders: list[str], baseline: str | None = None) -> str:
    """One table over several eval folders' reports (e.g. base model and adapter, plain and
    speculative): per (folder, method, gamma) accuracy, tokens and seconds per answer, and time
    and tokens relative to the baseline row (default: the first folder's vanilla at gamma 1.0,
    else its first row). ``baseline``: ``FOLDER:METHOD:GAMMA``."""
    rows = []
    for folder in folders:
        path = Path(folder) / "report.json"
        if not path.is_file():
            raise InvalidArgument("folders", f"{str(folder)!r} has no report.json: run `specdecode tokenskip eval --out {folder}` first")
        report = json.loads(path.read_text())
        for e in report["results"]:
            rows.append({"folder": str(folder), "adapter": report["settings"].get("adapter"), **e})
    if not rows:
        raise InvalidArgument("folders", "the reports hold no results")
    if baseline is not None:
        try:
            f, m, g = baseline.rsplit(":", 2)
            base = next(r for r in rows if r["folder"] == f and r["method"] == m and r["ratio"] == float(g))
        except (ValueError, StopIteration):
            raise InvalidArgument("baseline", f"expected FOLDER:METHOD:GAMMA naming a row of the reports, got {baseline!r}") from None
    else:
        first = [r for r in rows if r["folder"] == str(folders[0])]
        base = next((r for r in first if r["method"] == "vanilla" and r["ratio"] == 1.0), first[0] if first else rows[0])
    lines = [
        f"baseline: {base['folder']} {base['method']} gamma {base['ratio']}", "",
        "| folder | adapter | method | gamma | n | accuracy | mean CoT tokens | mean new tokens | s/answer | tokens vs baseline | speedup vs baseline (time) | identical to vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        ident = f"{r['identical_to_vanilla']}/{r['compared_with_vanilla']}" if "identical_to_vanilla" in r else "-"
        tokens = r["mean_new_tokens"] / base["mean_new_tokens"] if base["mean_new_tokens"] else float("nan")
        speed = base["seconds_per_answer"] / r["seconds_per_answer"] if r["seconds_per_answer"] else float("nan")
        lines.append(
            f"| {r['folder']} | {'yes' if r['adapter'] else 'no'} | {r['method']} | {r['ratio']} | {r['n']} | "
            f"{100 * r['accuracy']:.1f}% | {r['mean_cot_tokens']:.1f} | {r['mean_new_tokens']:.1f} | "
            f"{r['seconds_per_answer']:.2f} | {tokens:.2f}x | {speed:.2f}x | {ident} |"
        )
    return "\n".join(lines) + "\n"
