"""The report of a benchmark folder: a terminal table, ``report.md``, ``summary.json`` and the
plots, all rebuilt from the answer files alone (``specdecode report DIR``)."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import InvalidArgument
from .answers import discover, read_answers
from .methods import default_baseline, known_methods
from .metrics import Answers, accept_length_counts, summarize
from .plots import plot_accept_lengths, plot_speedups

SUMMARY_FILE, REPORT_FILE = "summary.json", "report.md"
SPEEDUP_PLOT, ACCEPT_PLOT = "speedup.png", "accept_lengths.png"


def collect(
    out: Path, methods: list[str] | None = None, question_ids: set[int] | None = None, runs: int | None = None
) -> Answers:
    """Answers under ``out``, optionally only of some methods, questions and the first ``runs`` runs."""
    answers: Answers = {}
    for run, files in discover(out).items():
        if runs is not None and run > runs:
            continue
        for method, path in files.items():
            if methods is not None and method not in methods:
                continue
            records = read_answers(path)
            if question_ids is not None:
                records = [r for r in records if r["question_id"] in question_ids]
            answers.setdefault(run, {})[method] = records
    return answers


def _method_order(names: list[str]) -> list[str]:
    known = known_methods()
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


# ---- formatting ----------------------------------------------------------------------------------
def _num(value: float | None, fmt: str, std: float | None = None, suffix: str = "") -> str:
    if value is None:
        return "-"
    text = format(value, fmt) + suffix
    return text + (f" ± {format(std, fmt)}" if std is not None else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


HEADERS = ("subtask", "method", "speedup", "tokens/s", "decode tok/s", "mean accepted", "accept rate", "exact match")


def table_rows(summary: dict[str, Any]) -> list[list[list[str]]]:
    """Rows grouped by subtask: [[subtask, method, speedup, tok/s, MAT, accept rate, exact], ...]."""
    groups = []
    lossy = summary.get("lossy") or {}
    for subtask in summary["subtasks"]:
        rows = []
        for method in summary["methods"]:
            c = summary["results"][method].get(subtask)
            if not c:
                continue
            exact = _pct(c["exact_match"]) + ("" if c["exact_match"] is None else f" vs {c['exact_match_reference']}")
            if method in lossy and c.get("token_agreement") is not None:
                exact += f", {_pct(c['token_agreement'])} of tokens"
            rows.append([
                subtask if not rows else "", method + (" (LOSSY)" if method in lossy else ""),
                _num(c["speedup"], ".2f", c["speedup_std"], "x"),
                _num(c["tokens_per_second"], ".1f", c["tokens_per_second_std"]),
                _num(c.get("decode_tokens_per_second"), ".1f"),
                _num(c["mean_accepted_tokens"], ".2f"),
                _pct(c["acceptance_rate"]),
                exact,
            ])  # fmt: skip
        if rows:
            groups.append(rows)
    return groups


def print_table(summary: dict[str, Any], title: str, file: TextIO | None = None) -> None:
    file = file or sys.stdout
    groups = table_rows(summary)
    memory = "  ".join(f"{m}: {_mib(summary['peak_memory_bytes'].get(m))}" for m in summary["methods"])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(h), *(len(r[i]) for g in groups for r in g)) for i, h in enumerate(HEADERS)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        print(title, file=file)
        print(line(HEADERS), file=file)
        for g in groups:
            print("-" * (sum(widths) + 2 * len(widths)), file=file)
            for r in g:
                print(line(r), file=file)
        print(f"peak memory  {memory}", file=file)
        return
    table = Table(title=title, caption=f"peak memory  {memory}")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right")
    for g in groups:
        for j, r in enumerate(g):
            table.add_row(*r, end_section=j == len(g) - 1)
    Console(file=file, width=max(100, len(memory) + 20)).print(table)


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    config = meta.get("config") or {}
    lines = [
        f"# Spec-Bench report: {config.get('model', '?')}",
        "",
        f"- Created {meta['created']}; runs: {len(summary['runs'])}; baseline: `{summary['baseline']}`.",
        f"- Settings: max_new_tokens={config.get('max_new_tokens')}, temperature={config.get('temperature')}, "
        f"dtype={meta.get('dtype', config.get('dtype'))}, device={meta.get('device', '?')}, threads={meta.get('threads', '?')}.",
        "- Questions per subtask: " + ", ".join(f"{s} {n}" for s, n in summary["questions"].items()) + ".",
    ]
    if meta.get("cpu"):
        lines.append(f"- CPU: {meta['cpu']}.")
    for key in ("cost_curve", "cost_curve_long"):
        if meta.get(key):
            lines.append(f"- Target's {meta[key]}.")
    if meta.get("options"):
        lines.append("- Method options: " + "; ".join(f"`{m}` {o}" for m, o in meta["options"].items() if o) + ".")
    for m, rule in (summary.get("lossy") or {}).items():
        lines.append(
            f"- **`{m}` is LOSSY** ({rule}): its answers may differ from plain decoding; the exact-match "
            "column gives the share of identical answers and of tokens reproduced before the first difference."
        )
    if summary["incomplete_questions"]:
        lines.append(f"- {summary['incomplete_questions']} answer(s) left out: not every method answered them.")
    if meta.get("skipped"):
        lines.append(f"- {skipped_line(meta['skipped'])}")
    if meta.get("interrupted"):
        lines.append("- **Interrupted**: these numbers cover the questions answered before the stop.")
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for g in table_rows(summary):
        lines += ["| " + " | ".join(r) + " |" for r in g]
    subtasks = summary["subtasks"]
    lines += ["", "## Speedup", "", "| method | " + " | ".join(subtasks) + " |", "|" + "---|" * (len(subtasks) + 1)]
    for m in summary["methods"]:
        cells = [summary["results"][m].get(s) or {} for s in subtasks]
        lines.append(f"| {m} | " + " | ".join(_num(c.get("speedup"), ".2f", None, "x") for c in cells) + " |")
    lines += ["", "## Drafted and verified tokens (all questions)", "",
              "| method | drafted | verified (after payoff's cut) | accepted share of drafted |", "|---|---|---|---|"]
    for m in summary["methods"]:
        c = summary["results"][m].get("overall") or {}
        if c.get("drafted_tokens"):
            lines.append(f"| {m} | {c['drafted_tokens']} | {c.get('verified_draft_tokens') if c.get('verified_draft_tokens') is not None else '-'} "
                         f"| {_pct(c.get('acceptance_rate'))} |")  # fmt: skip
    lines += ["", "## Peak memory", "", "| method | peak memory | drafter's own |", "|---|---|---|"]
    lines += [f"| {m} | {_mib(summary['peak_memory_bytes'].get(m))} | {_mib((summary.get('drafter_bytes') or {}).get(m))} |"
              for m in summary["methods"]]  # fmt: skip
    lines += [
        "",
        f"![speedup]({SPEEDUP_PLOT})",
        "",
        f"![accepted lengths]({ACCEPT_PLOT})",
        "",
        "Tokens/s is the mean over questions of sum(new tokens) / sum(wall time) of the question's turns; "
        "decode tok/s leaves out each turn's prompt and first decoding step (how llama.cpp reports decoding); "
        "speedup divides it by the baseline's on the same questions (Spec-Bench's `evaluation/speed.py`); "
        "± is the standard deviation over runs. Mean accepted is the mean number of tokens emitted per "
        "decoding step; accept rate is accepted / drafted tokens; exact match is the share of questions "
        "whose output tokens equal those of the plain decoding of the same implementation (our vanilla for "
        "our methods, hf-vanilla for the peers; greedy decoding only). See docs/bench.md.",
        "",
    ]
    return "\n".join(lines)


def skipped_line(skipped: list[dict]) -> str:
    ids = ", ".join(f"{r['question_id']} ({r['category']})" for r in skipped)
    return f"{len(skipped)} question(s) skipped, longer than the model's context: {ids}."


def _title(summary: dict[str, Any], config: dict[str, Any]) -> str:
    return f"Spec-Bench: {config.get('model', '?')}, speedup over {summary['baseline']}"


def build_report(
    out: Path,
    *,
    baseline: str | None = None,
    methods: list[str] | None = None,
    question_ids: set[int] | None = None,
    runs: int | None = None,
    meta: dict[str, Any] | None = None,
    file: TextIO | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Summarize the answers under ``out``; print the table; write the report, JSON and plots."""
    out = Path(out)
    answers = collect(out, methods, question_ids, runs)
    present = _method_order(list(dict.fromkeys(m for by_method in answers.values() for m in by_method if by_method[m])))
    if not present:
        raise InvalidArgument("out", f"no answers under {out / 'answers'}")
    meta = dict(meta or {})
    previous = out / SUMMARY_FILE
    if previous.exists() and meta.get("config") is None:  # rebuilding: keep what the run recorded
        try:
            old = json.loads(previous.read_text())
            meta = {**{k: v for k, v in old.items() if k not in ("summary", "created")}, **meta}
        except (OSError, json.JSONDecodeError):
            pass
    baseline = baseline or meta.get("baseline") or default_baseline(present)
    if baseline not in present:
        raise InvalidArgument("baseline", f"{baseline!r} has no answers here; methods with answers: {', '.join(present)}")
    order = [m for m in (methods or present) if m in present]
    summary = summarize(answers, baseline, order)
    if meta.get("config") is None:
        first = next(r for by_method in answers.values() for rs in by_method.values() for r in rs)
        meta["config"] = {k: v for k, v in first.get("config", {}).items() if k not in ("method", "options")}
    meta.update(baseline=baseline, created=_dt.datetime.now().isoformat(timespec="seconds"))
    print_table(summary, _title(summary, meta["config"]), file)
    if meta.get("skipped"):
        print(skipped_line(meta["skipped"]), file=file or sys.stdout)
    (out / SUMMARY_FILE).write_text(json.dumps({**meta, "summary": summary}, indent=2) + "\n")
    (out / REPORT_FILE).write_text(markdown(summary, meta))
    if plots:
        plot_speedups(summary, out / SPEEDUP_PLOT, _title(summary, meta["config"]))
        plot_accept_lengths(accept_length_counts(answers, summary["methods"]), out / ACCEPT_PLOT)
    return summary
