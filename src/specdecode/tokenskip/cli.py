"""``specdecode tokenskip``: solve | compress | train | eval | merge | run (solve+compress+train).

Each step reads and writes one folder (``--out``): solve.jsonl -> compressed.jsonl -> adapter/;
each resumes where a killed run stopped. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..cli_options import DEVICE_OPTION, METHOD_OPTIONS_OPTION, MODEL_OPTION, fail, method_options
from ..errors import SpecDecodeError

app = typer.Typer(no_args_is_help=True, help="TokenSkip: controllable chain-of-thought compression (train and evaluate on GSM8K).")

OUT = typer.Option(..., "--out", help="Work folder: every step reads and appends its files here (resumable).")
THREADS = typer.Option(None, help="torch CPU threads (default: torch's choice).")
QUIET = typer.Option(False, "--quiet", help="No progress bars.")
TRAIN_DATA = "../shared/data/gsm8k/train.jsonl"
TEST_DATA = "../shared/data/gsm8k/test.jsonl"


def _run(fn, threads):
    from .runs import set_threads

    try:
        set_threads(threads)
        return fn()
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))


def _ratios(text: str, argument: str):
    from .prompts import parse_ratios

    try:
        return parse_ratios(text, argument)
    except SpecDecodeError as e:
        fail(str(e))


@app.command()
def solve(
    model: str = MODEL_OPTION,
    out: str = OUT,
    data: str = typer.Option(TRAIN_DATA, help="GSM8K train .jsonl (question, answer)."),
    limit: Optional[int] = typer.Option(None, help="Solve this many problems (default: all)."),
    offset: int = typer.Option(0, help="Start at this problem (with --limit: a slice of the file)."),
    seed: Optional[int] = typer.Option(None, help="With --limit: a seeded random sample instead of the first N."),
    method: str = typer.Option("pld", help="Decoding method (exact: the answers are plain greedy decoding's)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per answer (the paper: 512)."),
    max_cot_tokens: int = typer.Option(500, help="Keep chains of thought of at most this many tokens (the paper: 500)."),
    max_num_seqs: int = typer.Option(8, help="Answers decoded together (continuous batching; 1 = one at a time)."),
    chunk: Optional[int] = typer.Option(None, help="Problems per batched call; rows are written after each (default 4 x --max-num-seqs)."),
    option: Optional[list[str]] = METHOD_OPTIONS_OPTION,
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
):
    """The target solves GSM8K train (greedy); correct chains of thought of <= 500 tokens are kept."""
    from .solve import solve as run

    s = _run(lambda: run(model, data, out, limit=limit, offset=offset, seed=seed, method=method, dtype=dtype, device=device,
                         max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens, max_num_seqs=max_num_seqs,
                         chunk=chunk, options=method_options(option), progress=not quiet), threads)  # fmt: skip
    typer.echo(f"tokenskip solve: {s['problems']} problems, accuracy {100 * s['accuracy']:.1f}%, kept {s['kept']} "
               f"(mean CoT tokens {s['mean_cot_tokens_kept']:.1f}), {s['seconds_per_answer']:.2f} s/answer")  # fmt: skip


@app.command()
def compress(
    model: str = MODEL_OPTION,
    out: str = OUT,
    scorer: str = typer.Option("selfinfo", help="selfinfo (a local causal LM's token surprisal) or llmlingua2 (the paper's; needs llmlingua + hub)."),
    scorer_model: Optional[str] = typer.Option(None, help="selfinfo: the scoring LM (default: --model); llmlingua2: the classifier."),
    ratios: str = typer.Option("0.9,0.8,0.7,0.6,0.5", help="Compression ratios gamma (the paper's five)."),
    keep_digits: Optional[bool] = typer.Option(
        None, "--keep-digits/--no-keep-digits",
        help="Always keep words with a digit (default: on for selfinfo, off for llmlingua2 as the paper's Qwen recipe).",
    ),
    force_tokens: Optional[list[str]] = typer.Option(None, "--force-token", help="Always keep words holding this text (repeatable; LLaMA-3 recipe: Step and :)."),
    limit: Optional[int] = typer.Option(None, help="Compress only the first N kept chains."),
    dtype: str = typer.Option("float32", help="The selfinfo scorer's dtype."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
):
    """Score each kept chain of thought's tokens and prune it to every ratio gamma."""
    from .compress import compress as run

    gammas = _ratios(ratios, "ratios")
    s = _run(lambda: run(model, out, scorer=scorer, scorer_model=scorer_model, ratios=gammas, keep_digits=keep_digits,
                         force_tokens=tuple(force_tokens or ()), dtype=dtype, device=device, progress=not quiet,
                         limit=limit), threads)  # fmt: skip
    parts = [f"{g}: {v['token_ratio']:.3f}" for g, v in s["ratios"].items() if v["token_ratio"] is not None]
    typer.echo(f"tokenskip compress: {s['chains']} chains; kept/original tokens per gamma: {', '.join(parts)}")


@app.command()
def train(
    model: str = MODEL_OPTION,
    out: str = OUT,
    epochs: float = typer.Option(3, help="Epochs (the paper: 3)."),
    lr: float = typer.Option(5e-5, help="AdamW learning rate (the paper: 5e-5)."),
    rank: int = typer.Option(8, help="LoRA rank (the paper: 8)."),
    alpha: int = typer.Option(16, help="LoRA alpha (the paper: 16)."),
    dropout: float = typer.Option(0.0, help="LoRA dropout."),
    grad_accum: int = typer.Option(8, help="Examples per optimizer step (batch 1 x accumulation; the paper: 8)."),
    warmup: float = typer.Option(0.1, help="Linear warm-up, as a fraction of the steps (then cosine)."),
    cutoff: int = typer.Option(2048, help="Longest example, in tokens."),
    seed: int = typer.Option(42, help="Seed of the per-example gamma draw and of the shuffling."),
    save_every: int = typer.Option(50, help="Checkpoint every N optimizer steps (and at each epoch's end)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps in all (a short run)."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N examples only."),
    dtype: str = typer.Option("auto", help="Base weights' dtype (auto: float32 on CPU, bfloat16 on CUDA)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations (large models on a GPU)."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
):
    """LoRA SFT (peft) on question <sep> gamma <sep> -> compressed CoT + answer; adapter in OUT/adapter."""
    from .train import train as run

    s = _run(lambda: run(model, out, epochs=epochs, lr=lr, rank=rank, alpha=alpha, dropout=dropout, grad_accum=grad_accum,
                         warmup=warmup, cutoff=cutoff, seed=seed, save_every=save_every, max_steps=max_steps, limit=limit,
                         device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                         progress=not quiet), threads)  # fmt: skip
    typer.echo(f"tokenskip train: {s['examples']} examples, {s['optimizer_steps']} steps, loss {s['first_loss']:.4f} -> "
               f"{s['last_loss']:.4f}, {s['seconds']:.0f}s; adapter in {out}/adapter")  # fmt: skip


@app.command("eval")
def evaluate(
    model: str = MODEL_OPTION,
    out: str = OUT,
    data: str = typer.Option(TEST_DATA, help="GSM8K test .jsonl."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a fixed subset of N problems (default: all)."),
    seed: Optional[int] = typer.Option(None, help="With --limit: a seeded random sample instead of the first N."),
    ratios: str = typer.Option("1.0,0.8,0.6", help="Ratios gamma to evaluate (1.0: no ratio in the prompt)."),
    adapter: Optional[str] = typer.Option(None, help="A LoRA adapter folder (peft), merged into --model at load."),
    method: str = typer.Option("vanilla", help="Decoding method (every method is exact: same answers, other speed)."),
    suffix: Optional[str] = typer.Option(None, help="Text (or a text file) appended to each question."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per answer (the paper: 512)."),
    max_num_seqs: int = typer.Option(1, help="Answers decoded together (1: one at a time, per-answer timings)."),
    option: Optional[list[str]] = METHOD_OPTIONS_OPTION,
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
):
    """GSM8K test at each gamma: accuracy, CoT tokens, measured ratio, time; report.md/.json + plot."""
    from .evaluate import evaluate as run, summary_line

    gammas = _ratios(ratios, "ratios")
    report = _run(lambda: run(model, data, out, ratios=gammas, adapter=adapter, method=method, limit=limit, seed=seed,
                              suffix=suffix, dtype=dtype, device=device, max_new_tokens=max_new_tokens,
                              max_num_seqs=max_num_seqs, options=method_options(option), progress=not quiet), threads)  # fmt: skip
    typer.echo(f"report: {out}/report.md, {out}/report.json, {out}/accuracy_vs_tokens.png")
    typer.echo(summary_line(report, method))


@app.command()
def merge(
    model: str = MODEL_OPTION,
    adapter: str = typer.Option(..., help="The LoRA adapter folder (peft format)."),
    out: str = typer.Option(..., "--out", help="Folder to write the merged model to (safetensors + config + tokenizer)."),
    dtype: str = typer.Option("auto", help="Saved dtype (auto: the base's)."),
):
    """Merge a LoRA adapter into its base: a model folder every backend (native included) loads."""
    from .merge import merge_adapter

    path = _run(lambda: merge_adapter(model, adapter, out, dtype=dtype), None)
    typer.echo(str(path))


@app.command("run")
def pipeline(
    model: str = MODEL_OPTION,
    out: str = OUT,
    data: str = typer.Option(TRAIN_DATA, help="GSM8K train .jsonl."),
    limit: Optional[int] = typer.Option(None, help="Solve this many training problems (default: all 7473)."),
    method: str = typer.Option("pld", help="Decoding method for solve."),
    max_num_seqs: int = typer.Option(8, help="Answers decoded together in solve."),
    scorer: str = typer.Option("selfinfo", help="selfinfo or llmlingua2."),
    epochs: float = typer.Option(3, help="Training epochs."),
    max_steps: Optional[int] = typer.Option(None, help="Stop training after N optimizer steps."),
    dtype: str = typer.Option("auto", help="Decoding dtype for solve (and eval)."),
    eval_limit: Optional[int] = typer.Option(None, help="Then evaluate the adapter on this many test problems (OUT/eval)."),
    test_data: str = typer.Option(TEST_DATA, help="GSM8K test .jsonl for --eval-limit."),
    eval_ratios: str = typer.Option("1.0,0.9,0.8,0.7,0.6,0.5", help="Ratios for --eval-limit."),
    eval_method: str = typer.Option("pld", help="Decoding method for --eval-limit (batched: --max-num-seqs)."),
    device: str = DEVICE_OPTION,
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
):
    """solve -> compress -> train (-> eval with --eval-limit) in one command; each step resumes,
    so after a kill the same command goes on where it stopped."""
    from .compress import compress as run_compress
    from .evaluate import evaluate as run_eval, summary_line
    from .solve import solve as run_solve
    from .train import train as run_train

    gammas = _ratios(eval_ratios, "eval_ratios")

    def go():
        s = run_solve(model, data, out, limit=limit, method=method, dtype=dtype, device=device,
                      max_num_seqs=max_num_seqs, progress=not quiet)  # fmt: skip
        typer.echo(f"solve: {json.dumps(s)}", err=True)
        c = run_compress(model, out, scorer=scorer, device=device, progress=not quiet)
        typer.echo(f"compress: {json.dumps(c)}", err=True)
        t = run_train(model, out, epochs=epochs, max_steps=max_steps, device=device, progress=not quiet)
        typer.echo(f"tokenskip train: {t['examples']} examples, {t['optimizer_steps']} steps, loss {t['first_loss']:.4f} -> "
                   f"{t['last_loss']:.4f}; adapter in {out}/adapter")  # fmt: skip
        if eval_limit is not None:
            report = run_eval(model, test_data, f"{out}/eval", ratios=gammas, adapter=f"{out}/adapter", method=eval_method,
                              limit=eval_limit, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                              progress=not quiet)  # fmt: skip
            typer.echo(f"report: {out}/eval/report.md")
            typer.echo(summary_line(report, eval_method))

    _run(go, threads)


@app.command("compare")
def compare_reports(
    folders: list[str] = typer.Argument(..., help="Eval folders (each with report.json)."),
    baseline: Optional[str] = typer.Option(None, help="FOLDER:METHOD:GAMMA (default: the first folder's vanilla at 1.0)."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the table to this markdown file."),
):
    """One table over eval folders: TokenSkip alone, speculation alone, both, against a baseline."""
    from pathlib import Path

    from .evaluate import compare

    table = _run(lambda: compare(folders, baseline), None)
    if out:
        Path(out).write_text(table)
    typer.echo(table)
