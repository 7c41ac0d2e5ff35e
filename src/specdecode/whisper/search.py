"""``specdecode whisper search``: find a prompt suffix that makes the model reason in fewer
tokens at the same accuracy (Whisper's search, on our exact decoding).

1. A fixed development split of GSM8K *train* (``dev`` problems drawn with ``seed``; never the
   test problems a report uses).
2. The base prompt (TokenSkip's instruction and the question, no suffix) is scored, then the
   starting set (or ``--candidates FILE``), then ``rounds`` rounds of ``per_round`` new
   candidates written by a writer LLM shown the best so far.
3. Each candidate is scored by the TokenSkip evaluation with ``suffix=`` (greedy, decoded with
   ``method``, batched by ``max_num_seqs``: exact, so the scores are plain greedy decoding's):
   accuracy and mean chain-of-thought tokens. It is *kept* when its accuracy is at least the
   base's minus ``tolerance``; kept candidates are ranked by tokens (fewest first).
4. ``candidates.json`` (every candidate with its scores), ``report.md``, ``pareto.png``
   (accuracy against tokens, the Pareto front drawn) and ``best_suffix.txt`` (the best kept
   suffix; empty when none beats the base prompt).

Resumable: each candidate's answers are kept in ``scores/<id>/`` (the evaluation's own
resumable files) and each round's written candidates in ``written.jsonl``, so a rerun scores
only what is missing and asks the writer only for rounds it has not written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import checks as opt
from ..tokenskip.data import load_gsm8k, select
from ..tokenskip.runs import check_settings, load_engine, model_label
from ..tokenskip.store import JsonlStore, read_rows
from .candidates import Candidate, normalise, parse_suffixes, read_candidates, starting_set

SHOWN_TO_WRITER = 6


def _score(report: dict, method: str) -> dict:
    e = next(r for r in report["results"] if r["method"] == method and r["ratio"] == 1.0)
    return {k: e[k] for k in ("n", "accuracy", "mean_cot_tokens", "mean_new_tokens", "seconds_per_answer", "wall_seconds", "truncated")}


def rank(scored: list[dict], base: dict, tolerance: float) -> list[dict]:
    """Every candidate marked ``kept`` (scored on the whole dev split, accuracy >= base -
    tolerance) and ordered: kept ones by tokens (then accuracy), then the rest by accuracy (then
    tokens)."""
    floor = base["accuracy"] - tolerance - 1e-9
    out = [{**c, "kept": not c.get("screened_out") and c["accuracy"] >= floor} for c in scored]
    return sorted(out, key=lambda c: (not c["kept"], c["mean_cot_tokens"] if c["kept"] else -c["accuracy"],
                                      -c["accuracy"] if c["kept"] else c["mean_cot_tokens"]))  # fmt: skip


def best_of(ranked: list[dict], base: dict) -> dict | None:
    """The kept candidate with the fewest tokens, if it writes fewer than the base prompt."""
    return next((c for c in ranked if c["kept"] and c["mean_cot_tokens"] < base["mean_cot_tokens"]), None)


def pareto_front(points: list[dict]) -> list[dict]:
    """The candidates no other beats on both accuracy (higher) and tokens (fewer)."""
    front = []
    for p in sorted(points, key=lambda p: (p["mean_cot_tokens"], -p["accuracy"])):
        if not front or p["accuracy"] > front[-1]["accuracy"]:
            front.append(p)
    return front


def screened_out(first: dict, base_first: dict, slack: float) -> str | None:
    """Why a candidate scored on the first dev problems only is not worth the rest, or None:
    it is not shorter than the base there (so it cannot become the best), or its accuracy there
    is below the base's by more than ``slack`` (a wide margin: a few problems are noisy)."""
    if first["mean_cot_tokens"] >= base_first["mean_cot_tokens"]:
        return "not shorter than the base"
    if first["accuracy"] < base_first["accuracy"] - slack - 1e-9:
        return f"accuracy more than {100 * slack:.0f} points below the base"
    return None


def search(model: str, out: str, *, data: str, dev: int = 50, seed: int = 0, rounds: int = 2, per_round: int = 4,
           tolerance: float = 0.02, screen: int = 0, screen_slack: float = 0.15, method: str = "pld", max_num_seqs: int = 8, max_new_tokens: int = 512,
           dtype: str = "auto", device: str = "cpu", options: dict | None = None, candidates: str | None = None,
           writer=None, writer_url: str | None = None, writer_model: str | None = None, writer_key: str | None = None,
           writer_temperature: float = 0.8, progress: bool = True, engine=None, log=print) -> dict:  # fmt: skip
    """Run (or resume) the search; returns the summary written to ``summary.json``."""
    from ..tokenskip.evaluate import answers_file, evaluate

    opt.integer("dev", dev)
    opt.integer("per_round", per_round)
    opt.integer("rounds", rounds, minimum=0, meaning="0: the starting set only")
    opt.integer("screen", screen, minimum=0, meaning="0: off")
    opt.number("tolerance", tolerance, 0.0, 1.0)
    opt.number("screen_slack", screen_slack, 0.0, 1.0)
    opt.number("writer_temperature", writer_temperature, 0.0, 2.0)
    problems = select(load_gsm8k(data), dev, seed=seed)
    out_dir = Path(out)
    settings = {"model": model_label(model), "data": str(Path(data).expanduser().resolve()), "dev": dev, "seed": seed,
                "max_new_tokens": max_new_tokens, "dtype": dtype}  # fmt: skip
    check_settings(out_dir / "search_settings.json", settings, "whisper search")
    initial = read_candidates(candidates) if candidates else starting_set()
    # A folder holds one search: what earlier runs scored stays in it (a second run with another
    # --candidates file adds to the pool), read back without decoding anything again.
    earlier = out_dir / "candidates.json"
    if earlier.is_file():
        seen = {c.id for c in initial}
        for c in json.loads(earlier.read_text(encoding="utf-8"))["candidates"]:
            if c["id"] not in seen:
                initial.append(Candidate(c["text"], c["angle"], c["round"], c["source"]))

    started = time.perf_counter()
    state = {"engine": engine, "scored_now": 0}

    def get_engine():
        if state["engine"] is None:
            state["engine"] = load_engine(model, method, dtype=dtype, device=device, options=options, progress=progress)
        return state["engine"]

    # Screening: each candidate is scored on the first ``screen`` dev problems, and on the rest
    # only when it may still be kept and be the shortest (the same answers are reused).
    first = [p.index for p in problems[:screen]] if 0 < screen < len(problems) else None

    def score(suffix: str | None, folder: str, only: list[int] | None = None) -> dict:
        target = out_dir / "scores" / folder
        answers = answers_file(target, method, 1.0)
        before = len(read_rows(answers))
        report = evaluate(model, data, str(target), ratios=[1.0], method=method, limit=dev, seed=seed, suffix=suffix,
                          dtype=dtype, device=device, max_new_tokens=max_new_tokens, max_num_seqs=max_num_seqs,
                          options=options, progress=progress, engine=_Lazy(get_engine), only=only)  # fmt: skip
        state["scored_now"] += len(read_rows(answers)) > before  # decoded something for it
        return _score(report, method)

    written = JsonlStore(out_dir / "written.jsonl", key="round")
    if writer is None and any(r not in written for r in range(1, rounds + 1)):
        if writer_url:  # reached now, so that a bad URL fails before any scoring
            from .writer import EndpointWriter

            writer = EndpointWriter(writer_url, model=writer_model, api_key=writer_key, temperature=writer_temperature)
        else:
            from .writer import TargetWriter

            writer = _LazyWriter(lambda: TargetWriter(get_engine(), temperature=writer_temperature, seed=seed))

    log(f"whisper search: {len(problems)} dev problems, scoring the base prompt")
    base = {"id": "base", "text": "", "angle": "base", "round": 0, "source": "base prompt", **score(None, "base")}
    base_first = score(None, "base", first) if first else None
    log(f"base: accuracy {100 * base['accuracy']:.1f}%, {base['mean_cot_tokens']:.1f} tokens per answer")

    scored: dict[str, dict] = {}

    def score_all(cands: list[Candidate]) -> None:
        for c in cands:
            if c.id in scored:
                continue
            why = None
            if first:
                s = score(c.text, c.id, first)
                why = screened_out(s, base_first, screen_slack)
            if why is None:
                s = score(c.text, c.id)
            against = base_first if why else base  # tokens compared on the same problems
            rel = s["mean_cot_tokens"] / against["mean_cot_tokens"] if against["mean_cot_tokens"] else float("nan")
            scored[c.id] = {**c.to_dict(), **s, "tokens_vs_base": round(rel, 4), "screened_out": why}
            log(f"round {c.round} [{c.angle}] accuracy {100 * s['accuracy']:.1f}%, {s['mean_cot_tokens']:.1f} tokens"
                + (f" on the first {s['n']} (screened out: {why})" if why else "") + f": {c.text}")  # fmt: skip

    score_all(initial)
    for r in range(1, rounds + 1):
        if r not in written:
            from .writer import writer_messages

            ranked = rank(list(scored.values()), base, tolerance)[:SHOWN_TO_WRITER]
            messages = writer_messages(base, ranked, per_round)
            reply = writer(messages, r)
            known = {normalise(c["text"]) for c in scored.values()}
            new = [c for c in parse_suffixes(reply, round=r, source=getattr(writer, "source", "writer"))
                   if normalise(c.text) not in known][:per_round]  # fmt: skip
            written.append([{"round": r, "reply": reply, "candidates": [c.to_dict() for c in new]}])
            if not new:
                log(f"round {r}: the writer's reply held no new suffix")
        row = written.rows[r]
        score_all([Candidate(c["text"], c["angle"], c["round"], c["source"]) for c in row["candidates"]])

    ranked = rank(list(scored.values()), base, tolerance)
    best = best_of(ranked, base)
    summary = {
        "settings": settings, "method": method, "tolerance": tolerance, "screen": screen if first else 0,
        "screen_slack": screen_slack, "base": base, "best": best,
        "screened_out": sum(bool(c.get("screened_out")) for c in ranked),
        "candidates_scored": len(scored), "scored_this_run": state["scored_now"],
        "search_minutes_this_run": round((time.perf_counter() - started) / 60, 2),
        "search_minutes_total": round(_scoring_minutes(out_dir), 2),
    }  # fmt: skip
    (out_dir / "candidates.json").write_text(json.dumps({"base": base, "candidates": ranked}, indent=1, ensure_ascii=False))
    (out_dir / "best_suffix.txt").write_text((best["text"] + "\n") if best else "", encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out_dir / "report.md").write_text(_markdown(summary, ranked), encoding="utf-8")
    _plot(base, ranked, best, out_dir / "pareto.png")
    return summary


def _scoring_minutes(out_dir: Path) -> float:
    """Decoding time over every scored candidate (what the search cost, across resumed runs)."""
    return sum(r["seconds"] for f in out_dir.glob("scores/*/answers-*.jsonl") for r in read_rows(f)) / 60


class _Lazy:
    """An engine loaded on first use: a resumed search whose candidates are all scored never
    loads the model."""

    def __init__(self, make):
        self._make = make

    def __getattr__(self, name):
        return getattr(self._make(), name)


class _LazyWriter:
    def __init__(self, make):
        self._make, self._writer = make, None

    @property
    def source(self) -> str:
        return "target"

    def __call__(self, messages, round):
        self._writer = self._writer or self._make()
        return self._writer(messages, round)


def summary_line(summary: dict) -> str:
    b, best = summary["base"], summary["best"]
    head = f"whisper search [{summary['method']}] {b['n']} dev problems, {summary['candidates_scored']} candidates"
    base = f"base: accuracy {100 * b['accuracy']:.1f}%, mean CoT tokens {b['mean_cot_tokens']:.1f}"
    if best is None:
        return f"{head} | {base} | best: none kept shorter than the base (best_suffix.txt is empty)"
    cut = 1 - best["mean_cot_tokens"] / b["mean_cot_tokens"] if b["mean_cot_tokens"] else 0.0
    return (f"{head} | {base} | best: accuracy {100 * best['accuracy']:.1f}%, mean CoT tokens "
            f"{best['mean_cot_tokens']:.1f} ({100 * cut:.0f}% fewer) [{best['angle']}] {best['text']!r}")  # fmt: skip


def _markdown(summary: dict, ranked: list[dict]) -> str:
    s, b = summary["settings"], summary["base"]
    lines = [
        "# Whisper search", "",
        f"model `{s['model']}`; dev: {s['dev']} problems of `{s['data']}` (seed {s['seed']}); greedy, "
        f"{s['max_new_tokens']} new tokens at most, decoded with `{summary['method']}` (exact); kept when accuracy "
        f">= base - {summary['tolerance']}; {summary['candidates_scored']} candidates"
        + (f" ({summary['screened_out']} screened out on the first {summary['screen']} problems)" if summary["screen"] else "")
        + ", "
        f"{summary['search_minutes_total']:.1f} min of decoding.", "",
        "| rank | kept | n | accuracy | mean CoT tokens | tokens vs base (same problems) | angle | round | source | suffix |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| - | base | {b['n']} | {100 * b['accuracy']:.1f}% | {b['mean_cot_tokens']:.1f} | 1.00x | - | - | - | (none) |",
    ]  # fmt: skip
    for i, c in enumerate(ranked, 1):
        text = c["text"].replace("|", "\\|")
        kept = "yes" if c["kept"] else (f"no: screened out, {c['screened_out']}" if c.get("screened_out") else "no")
        lines.append(f"| {i} | {kept} | {c['n']} | {100 * c['accuracy']:.1f}% | {c['mean_cot_tokens']:.1f} | "
                     f"{c['tokens_vs_base']:.2f}x | {c['angle']} | {c['round']} | {c['source']} | {text} |")  # fmt: skip
    lines += ["", summary_line(summary), ""]
    return "\n".join(lines)


def _plot(base: dict, ranked: list[dict], best: dict | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    ranked = [c for c in ranked if not c.get("screened_out")]  # only whole-split scores compare
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [base, *ranked]
    ax.scatter([c["mean_cot_tokens"] for c in ranked], [100 * c["accuracy"] for c in ranked], c="tab:blue", label="candidates")
    ax.scatter([base["mean_cot_tokens"]], [100 * base["accuracy"]], c="black", marker="s", label="base prompt")
    front = pareto_front(pts)
    ax.plot([c["mean_cot_tokens"] for c in front], [100 * c["accuracy"] for c in front], c="tab:orange", label="Pareto front")
    if best:
        ax.scatter([best["mean_cot_tokens"]], [100 * best["accuracy"]], c="tab:red", marker="*", s=160, label="best kept")
    ax.set_xlabel("mean chain-of-thought tokens (dev)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Whisper search: accuracy vs tokens per candidate suffix")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
