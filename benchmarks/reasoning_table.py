"""One table over benchmarks/reasoning.sh's folders: per setting (base, whisper, tokenskip,
tokenskip+whisper) accuracy and chain-of-thought tokens on the accuracy subset, and per method
seconds per answer on the timing subset, against the base prompt decoded plainly.

Usage: python benchmarks/reasoning_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["base", "whisper", "tokenskip", "tokenskip+whisper"]


def rows(folder: Path) -> dict[str, dict[int, dict]]:
    """method -> problem index -> answer row (the one ratio each setting is run at)."""
    out: dict[str, dict[int, dict]] = {}
    for f in sorted(folder.glob("answers-*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["method"], {})[r["index"]] = r
    return out


def main(out: Path) -> str:
    settings = [s for s in ORDER if (out / s).is_dir()]
    if "base" not in settings:
        sys.exit(f"{out}/base is missing: run benchmarks/reasoning.sh first")
    acc = {s: rows(out / s)["pld"] for s in settings}
    base = acc["base"]
    timing = {s: rows(out / f"{s}-time") for s in settings if (out / f"{s}-time").is_dir()}
    base_plain = timing.get("base", {}).get("vanilla")
    n_time = len(base_plain) if base_plain else 0
    methods = sorted({m for t in timing.values() for m in t}, key=lambda m: (m != "vanilla", m))
    n = len(base)
    head = ["setting", f"accuracy (n={n})", "right: both / only base / only this", "mean CoT tokens", "tokens vs base"]
    head += [f"{m} s/answer (n={n_time})" for m in methods] + [f"{m} vs base vanilla" for m in methods if m != "vanilla"]
    head += ["identical to vanilla"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_tokens = sum(r["cot_tokens"] for r in base.values()) / n
    base_s = sum(r["seconds"] for r in base_plain.values()) / n_time if base_plain else None
    for s in settings:
        a = acc[s]
        common = sorted(set(a) & set(base))
        both = sum(a[i]["correct"] and base[i]["correct"] for i in common)
        only_base = sum(base[i]["correct"] and not a[i]["correct"] for i in common)
        only_this = sum(a[i]["correct"] and not base[i]["correct"] for i in common)
        tokens = sum(r["cot_tokens"] for r in a.values()) / len(a)
        cells = [s, f"{100 * sum(r['correct'] for r in a.values()) / len(a):.1f}%", f"{both} / {only_base} / {only_this}",
                 f"{tokens:.1f}", f"{tokens / base_tokens:.2f}x"]  # fmt: skip
        t = timing.get(s, {})
        sec = {m: sum(r["seconds"] for r in t[m].values()) / len(t[m]) for m in methods if m in t}
        cells += [f"{sec[m]:.2f}" if m in sec else "-" for m in methods]
        cells += [f"{base_s / sec[m]:.2f}x" if m in sec and base_s else "-" for m in methods if m != "vanilla"]
        ident = []
        for m in methods:
            if m != "vanilla" and m in t and "vanilla" in t:
                same = sum(t[m][i]["token_ids"] == t["vanilla"][i]["token_ids"] for i in t[m] if i in t["vanilla"])
                ident.append(f"{m} {same}/{len(t[m])}")
        cells.append(", ".join(ident) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
