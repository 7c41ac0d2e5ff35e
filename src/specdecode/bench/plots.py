"""PNG plots of a summary: speedup per subtask per method, and accepted-length distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SpecDecodeError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SpecDecodeError("plots need matplotlib: pip install 'specdecode[bench]'") from None
    matplotlib.use("Agg")  # files only, no display (servers, CI, Ray workers)
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Grouped bars: one group per subtask (and overall), one bar per method; 1x = baseline."""
    plt = _pyplot()
    subtasks, methods = summary["subtasks"], summary["methods"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(subtasks) + 2), 4.2))
    for i, method in enumerate(methods):
        cells = [summary["results"][method].get(s) or {} for s in subtasks]
        values = [c.get("speedup") or 0.0 for c in cells]
        errors = [c.get("speedup_std") or 0.0 for c in cells]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(subtasks))]
        ax.bar(xs, values, width, yerr=errors if any(errors) else None, label=method, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(subtasks)), subtasks, rotation=20)
    ax.set_ylabel(f"speedup over {summary['baseline']}")
    ax.set_title(title or "Speedup per subtask")
    ax.legend(fontsize="small", ncols=min(len(methods), 4))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accept_lengths(counts: dict[str, dict[int, int]], path: Path, title: str = "") -> Path:
    """Share of decoding steps that emitted 1, 2, 3, ... tokens, one bar series per method."""
    plt = _pyplot()
    methods = [m for m, c in counts.items() if c]
    longest = max((n for m in methods for n in counts[m]), default=1)
    lengths = list(range(1, longest + 1))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * longest + 3), 4.2))
    for i, method in enumerate(methods):
        total = sum(counts[method].values())
        shares = [counts[method].get(n, 0) / total for n in lengths]
        xs = [n + (i - (len(methods) - 1) / 2) * width for n in lengths]
        ax.bar(xs, shares, width, label=method)
    ax.set_xticks(lengths)
    ax.set_xlabel("tokens emitted per decoding step (accepted draft tokens + 1)")
    ax.set_ylabel("share of steps")
    ax.set_title(title or "Accepted-length distribution")
    if methods:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
