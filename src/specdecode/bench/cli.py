"""``specdecode bench`` and ``specdecode report`` (registered by specdecode.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_options import DEVICE_OPTION, DTYPE_OPTION, fail

DEFAULT_METHODS = "vanilla,pld,hf-vanilla"
DEFAULT_OUT = "bench_out"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
    app.command("report")(report)


def bench(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Target model folder or known name."),
    questions: Optional[Path] = typer.Option(
        None, help="Spec-Bench question.jsonl (default: the small suite shipped with specdecode)."
    ),
    subtasks: str = typer.Option(
        "all", help="Comma-separated subtasks: mt_bench, translation, summarization, qa, math_reasoning, rag."
    ),
    per_subtask: int = typer.Option(1, help="Questions per subtask (0 = all)."),
    offset: int = typer.Option(0, help="Skip the first N questions of each subtask (held-out questions)."),
    max_new_tokens: int = typer.Option(64, help="Most new tokens per turn."),
    methods: str = typer.Option(
        DEFAULT_METHODS, help="Comma-separated methods: ours (vanilla, sps, pld, ...) and the peers hf-vanilla, hf-pld, "
        "hf-assisted; 'ours', 'peers' and 'all' stand for groups."
    ),
    method_option: Optional[list[str]] = typer.Option(
        None, "--method-option", "-O", help="method.key=value, e.g. pld.max_ngram=4 (repeatable)."
    ),
    draft_model: Optional[str] = typer.Option(None, help="Draft model for sps and hf-assisted."),
    quantize: Optional[str] = typer.Option(
        None, help="Serve the target quantized for our methods: int4, int4-gN (N = 32, 64, 128, 256) or int8 "
        "(the hf-* peers run the full-precision model)."
    ),
    draft_quant: Optional[str] = typer.Option(None, help="Quantize the sps draft model: int4, int4-gN or int8."),
    baseline: Optional[str] = typer.Option(None, help="Method the speedups are relative to (default hf-vanilla, else vanilla)."),
    temperature: float = typer.Option(0.0, help="0 = greedy (exact match is checked); > 0 samples."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    runs: int = typer.Option(1, help="Repeat the whole benchmark N times; report mean and standard deviation."),
    warmup: int = typer.Option(1, help="Untimed warm-up passes per method before timing."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    backend: str = typer.Option("auto", help="Backend of our methods: auto, native or hf."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (per worker)."),
    out: Path = typer.Option(Path(DEFAULT_OUT), "--out", "-o", help="Output folder (answers, report, plots)."),
    overwrite: bool = typer.Option(False, help="Discard earlier answers in --out instead of resuming."),
    workers: int = typer.Option(1, help="Shard questions over N Ray workers (needs the 'ray' extra)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting a local one."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Spec-Bench: speedup over plain decoding, per subtask, for our methods and transformers' own."""
    from ..errors import SpecDecodeError
    from .methods import parse_methods
    from .questions import default_questions_path, load_questions, parse_subtasks, select
    from .runner import run_bench
    from .worker import BenchConfig

    try:
        specs = parse_methods(methods, method_option)
        chosen = select(load_questions(questions or default_questions_path()), parse_subtasks(subtasks), per_subtask, offset)
        if threads is not None and threads < 1:
            fail(f"--threads: expected a positive integer, got {threads}")
        config = BenchConfig(
            model=model, methods=specs, draft_model=draft_model, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed, dtype=dtype, device=device, backend=backend,
            threads=threads, warmup=warmup, quantize=quantize, draft_quant=draft_quant,
        )  # fmt: skip
        if threads and workers == 1:
            import torch

            torch.set_num_threads(threads)
        outcome = run_bench(
            config, chosen, out, runs=runs, baseline=baseline, workers=workers, ray_address=ray_address,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))
        return
    if outcome.summary is not None:
        typer.echo(f"answers, report.md, summary.json and plots in {out}/")
    if outcome.interrupted:
        raise typer.Exit(130)


def report(
    out: Path = typer.Argument(Path(DEFAULT_OUT), help="A folder written by `specdecode bench`."),
    baseline: Optional[str] = typer.Option(None, help="Method the speedups are relative to (default: the run's)."),
):
    """Rebuild the table, report.md, summary.json and the plots from a folder's answer files."""
    from ..errors import SpecDecodeError
    from .report import build_report

    if not out.is_dir():
        fail(f"no folder {str(out)!r}")
    try:
        build_report(out, baseline=baseline)
    except SpecDecodeError as e:
        fail(str(e))
        return
    typer.echo(f"report.md, summary.json and plots rewritten in {out}/")
