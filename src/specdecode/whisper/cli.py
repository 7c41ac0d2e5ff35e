"""``specdecode whisper search``: a prompt suffix for shorter reasoning, found on GSM8K train."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_options import DEVICE_OPTION, METHOD_OPTIONS_OPTION, MODEL_OPTION, fail, method_options
from ..errors import SpecDecodeError

app = typer.Typer(no_args_is_help=True, help="Whisper: a searched prompt suffix for shorter reasoning (no training).")

TRAIN_DATA = "../shared/data/gsm8k/train.jsonl"


@app.command()
def search(
    model: str = MODEL_OPTION,
    out: str = typer.Option(..., "--out", help="Work folder (resumable: rerun to go on where a run stopped)."),
    data: str = typer.Option(TRAIN_DATA, help="GSM8K *train* .jsonl: the development split is drawn from it."),
    dev: int = typer.Option(50, help="Development problems (a seeded sample of --data)."),
    seed: int = typer.Option(0, help="Seed of the development sample and of the writer's sampling."),
    rounds: int = typer.Option(2, help="Rounds of new candidates written by the writer (0: the starting set only)."),
    per_round: int = typer.Option(4, help="New candidates per round."),
    tolerance: float = typer.Option(0.02, help="Keep a candidate when its accuracy is >= the base's minus this."),
    screen: int = typer.Option(0, help="Score each candidate on the first N dev problems, and on the rest only if it may still win (0: off)."),
    screen_slack: float = typer.Option(0.15, help="With --screen: drop a candidate whose accuracy there is this far below the base's."),
    candidates: Optional[str] = typer.Option(None, help="Starting set from a file (one suffix per line, `angle: text`)."),
    writer_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint that writes candidates (default: the target)."),
    writer_model: Optional[str] = typer.Option(None, help="Model name at --writer-url (default: the first it lists)."),
    writer_key: Optional[str] = typer.Option(None, help="API key for --writer-url (default: $OPENAI_API_KEY)."),
    writer_temperature: float = typer.Option(0.8, help="Sampling temperature of the writer."),
    method: str = typer.Option("pld", help="Decoding method for scoring (exact: scores are plain greedy decoding's)."),
    max_num_seqs: int = typer.Option(8, help="Answers decoded together (continuous batching; 1 = one at a time)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per answer."),
    option: Optional[list[str]] = METHOD_OPTIONS_OPTION,
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Score suffixes on GSM8K train problems; write candidates.json, report.md, pareto.png and
    best_suffix.txt (for `tokenskip eval --suffix FILE` and `-o reasoning_suffix=FILE`)."""
    from ..tokenskip.runs import set_threads
    from .search import search as run, summary_line

    try:
        set_threads(threads)
        summary = run(model, out, data=data, dev=dev, seed=seed, rounds=rounds, per_round=per_round, tolerance=tolerance,
                      screen=screen, screen_slack=screen_slack,
                      method=method, max_num_seqs=max_num_seqs, max_new_tokens=max_new_tokens, dtype=dtype, device=device,
                      options=method_options(option), candidates=candidates, writer_url=writer_url,
                      writer_model=writer_model, writer_key=writer_key, writer_temperature=writer_temperature,
                      progress=not quiet, log=lambda m: typer.echo(m, err=True))  # fmt: skip
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))
    typer.echo(summary_line(summary))
