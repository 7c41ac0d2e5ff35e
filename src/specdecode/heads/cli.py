"""``specdecode train-drafter``: the command over ``heads/train.py`` (docs/trained-drafters.md)."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_options import MODEL_OPTION, fail
from ..errors import SpecDecodeError


def train_drafter(
    model: str = MODEL_OPTION,
    kind: str = typer.Option("eagle3", "--kind", help="eagle3 (alias eagle), eagle1, medusa or specdec."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: the drafter cache, "
                                      "~/.cache/specdecode/drafters/<model>/<kind>/, where generate/bench/serve find it)."),
    prompts: list[str] = typer.Option([], "--prompts", help="jsonl file(s) of user prompts (question / prompt / text / "
                                      "turns / messages). Never Spec-Bench's questions."),
    synthesize: int = typer.Option(0, "--synthesize", help="Prompts the model writes itself (no dataset needed)."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="Use at most this many prompts from the files."),
    answer_tokens: int = typer.Option(256, "--answer-tokens", help="New tokens per answer the model writes."),
    draft_vocab: int = typer.Option(8192, "--draft-vocab", help="Draft vocabulary size (0: the target's lm_head)."),
    ttt_steps: int = typer.Option(3, "--ttt-steps", help="EAGLE-3 training-time test: steps the head is unrolled."),
    blocks: int = typer.Option(4, "--blocks", help="specdec: tokens per drafter forward; medusa: heads."),
    time_budget: float = typer.Option(3600.0, "--time-budget", help="Seconds for all phases together."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Training positions to read, at most."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    seed: int = typer.Option(0, "--seed"),
    prompts_share: float = typer.Option(0.07, "--prompts-share", help="Share of the time budget, at most, for --synthesize."),
    capture: bool = typer.Option(False, "--capture/--no-capture", help="Keep the hidden states of the answering forwards "
                                 "(no second pass over the data; for large models, where that pass costs as much as answering)."),
    data_from: Optional[str] = typer.Option(None, "--data-from", help="Reuse another train-drafter run's prompts, answers "
                                            "and features (its folder): a head of another kind on the same data."),
):
    """Train a draft head for MODEL by self-distillation (the model's own answers and hidden
    states); resumable: run the same command again after a kill."""
    from ..heads.store import drafters_dir
    from ..heads.train import TrainSettings, run

    kind = "eagle3" if kind == "eagle" else kind
    folder = out or str(drafters_dir() / model.rstrip("/").split("/")[-1] / kind)
    try:
        settings = TrainSettings(model=model, kind=kind, out=folder, prompts=list(prompts), synthesize=synthesize,
                                 max_prompts=max_prompts, answer_tokens=answer_tokens, draft_vocab=draft_vocab or None,
                                 ttt_steps=ttt_steps, blocks=blocks, time_budget=time_budget, max_tokens=max_tokens, lr=lr,
                                 threads=threads, seed=seed, data_from=data_from, capture=capture,
                                 prompts_share=prompts_share)  # fmt: skip
        report = run(settings)
    except SpecDecodeError as e:
        fail(str(e))
        return
    print(f"{folder}: mean accepted tokens {report['mean_accepted_tokens']} on {report['held_out_prompts']} held-out prompts")


def register(app: typer.Typer) -> None:
    app.command("train-drafter")(train_drafter)
