"""The ``specdecode`` command line: a thin layer over the Python API.

Each subcommand lives with its feature; this module only gathers them. What the commands share
(options, ``fail``, ``-o`` parsing) is in ``cli_options.py``.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .cli_options import (  # ADAPTER_OPTION: TokenSkip's --adapter (docs/tokenskip.md)
    ADAPTER_OPTION,
    ADAPTIVE_OPTION, BACKEND_OPTION, DEVICE_OPTION, DRAFT_LENGTH_OPTION, DRAFT_MODEL_OPTION, DRAFT_QUANT_OPTION,
    DTYPE_OPTION, METHOD_OPTION, METHOD_OPTIONS_OPTION, MODEL_OPTION, QUANTIZE_OPTION, VERIFY_OPTION, fail,
    method_options,
)  # fmt: skip
from .errors import SpecDecodeError
from .tokenskip.cli import app as tokenskip_app
from .whisper.cli import app as whisper_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Lossless speculative decoding for Hugging Face causal LMs: faster generation, identical output.",
)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text (a user message with --chat)."),
    model: str = MODEL_OPTION,
    method: str = METHOD_OPTION,
    draft_model: Optional[str] = DRAFT_MODEL_OPTION,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user message in the chat template."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples (lossless speculative sampling)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop string (repeatable)."),
    draft_length: Optional[int] = DRAFT_LENGTH_OPTION,
    adaptive: Optional[bool] = ADAPTIVE_OPTION,
    option: Optional[list[str]] = METHOD_OPTIONS_OPTION,
    dtype: str = DTYPE_OPTION,
    backend: str = BACKEND_OPTION,
    device: str = DEVICE_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    draft_quant: Optional[str] = DRAFT_QUANT_OPTION,
    verify: str = VERIFY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token ids, statistics)."),
    adapter: Optional[str] = ADAPTER_OPTION,
):
    """Generate text and print it with a one-line summary."""
    from .engine import Engine
    from .reasoning import ReasoningPrompt  # -o cot_ratio (TokenSkip), -o reasoning_suffix (Whisper)
    from .tokenskip.serving import with_adapter  # --adapter (TokenSkip)

    try:
        reasoning, options = ReasoningPrompt.from_options(method_options(option))
        model = with_adapter(model, adapter)
        engine = Engine.from_pretrained(
            model, method, draft_model=draft_model, backend=backend, dtype=dtype, device=device,
            draft_length=draft_length, adaptive=adaptive, quantize=quantize, draft_quant=draft_quant,
            verify=verify, **options,
        )  # fmt: skip
        request, _ = reasoning.apply([{"role": "user", "content": prompt}] if chat else prompt)
        args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        if as_json:
            result = engine.generate(request, **args)
            print(json.dumps({"model": model, "method": method, **result.to_dict()}))
            return
        stream = engine.stream(request, **args)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = stream.result.stats
        typer.secho(
            f"[{method}] {s.new_tokens} tokens in {s.total_time:.2f}s = {s.tokens_per_second:.1f} tok/s | "
            f"mean accepted tokens {s.mean_accepted_tokens:.2f} | target forwards {s.target_forwards}"
            + (f" | LOSSY: verify={s.verify}, output may differ from plain decoding" if s.lossy else ""),
            err=True, fg=typer.colors.CYAN,
        )  # fmt: skip
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))


@app.command()
def pull(
    names: list[str] = typer.Argument(None, help="Known model names (default: smollm2-135m)."),
    force: bool = typer.Option(False, help="Download and convert again even if cached."),
):
    """Put known models into the local cache ($SPECDECODE_MODELS or ~/.cache/specdecode/models)."""
    from .hub import DEFAULT_MODEL, KNOWN_MODELS, pull as pull_model

    for name in names or [DEFAULT_MODEL]:
        if name not in KNOWN_MODELS:
            fail(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
        try:
            print(pull_model(name, force=force))
        except SpecDecodeError as e:
            fail(str(e))


@app.command("models")
def list_models():
    """List the known model names and whether each is in the cache."""
    from .hub import KNOWN_MODELS, models_dir

    from .heads.store import list_cached

    for m in KNOWN_MODELS.values():
        here = (models_dir() / m.name / "config.json").exists()
        print(f"{m.name:22} {'cached ' if here else 'not yet'}  {m.description}")
    for model, kind, folder in list_cached():
        print(f"{model:22} drafter  {kind} head in {folder} (specdecode train-drafter)")


@app.command()
def tune(
    model: str = MODEL_OPTION,
    out: str = typer.Option(..., "--out", help="Skip-set file to write (JSON); reused with -o skip_set_file=..."),
    questions: Optional[str] = typer.Option(None, help="Spec-Bench question.jsonl (default: the built-in suite)."),
    task: Optional[str] = typer.Option(None, help="Tune on one subtask only, and record it in the file."),
    max_new_tokens: int = typer.Option(128, help="Tokens generated per prompt while tuning."),
    max_prompts: int = typer.Option(50, help="Most prompts to run before giving up."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="SWIFT option key=value (repeatable)."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
):
    """Run SWIFT's layer-set search over prompts until it settles, and save the chosen set."""
    from pathlib import Path

    from .bench.questions import default_questions_path, load_questions, subtask_of
    from .engine import Engine

    try:
        engine = Engine.from_pretrained(
            model, "swift", dtype=dtype, device=device, task=task, **method_options(option), optimize=True
        )
        drafter = engine.drafter
        items = load_questions(questions or default_questions_path())
        if task is not None:
            items = [q for q in items if subtask_of(q.category) == task]
            if not items:
                fail(f"--task: no question of subtask {task!r}")
        for i, q in enumerate(items[:max_prompts]):
            r = engine.generate([{"role": "user", "content": q.turns[0]}] if engine.tokenizer.chat_template else q.turns[0],
                                max_new_tokens=max_new_tokens)  # fmt: skip
            s = drafter.state
            typer.echo(
                f"prompt {i + 1}: score {s.score if s.score is None else round(s.score, 3)} after {s.steps} candidates "
                f"({s.seconds:.1f}s); mean accepted tokens {r.stats.mean_accepted_tokens:.2f}",
                err=True,
            )
            if s.done:
                break
        drafter.save(Path(out))
        s = drafter.state
        typer.echo(f"saved {out}: skip attention {s.attention}, mlp {s.mlp}, score {s.score}, {'settled' if s.done else 'still searching'}")
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))


@app.command()
def doctor(
    model: str = MODEL_OPTION,
    dtype: str = typer.Option("bfloat16", help="The dtype to check (bit-exactness is promised in bfloat16)."),
    device: str = DEVICE_OPTION,
    prompts: int = typer.Option(6, help="Prompts decoded with plain decoding and with the method, compared."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt."),
    method: str = typer.Option("pld", help="The speculative method compared with plain decoding."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Print the machine, each linear's row invariance, and whether greedy speculation is
    bit-exact here, with the evidence (plain and speculative decoding compared on real prompts)."""
    from .doctor import format_report, run_doctor

    if prompts < 1 or max_new_tokens < 1:
        fail("--prompts and --max-new-tokens: expected positive integers")
    if threads is not None:
        if threads < 1:
            fail(f"--threads: expected a positive integer, got {threads}")
        import torch

        torch.set_num_threads(threads)
    try:
        report = run_doctor(model, dtype=dtype, device=device, prompts=prompts, max_new_tokens=max_new_tokens,
                            method=method, progress=not as_json)  # fmt: skip
    except SpecDecodeError as e:
        fail(str(e))
    print(json.dumps(report, indent=1) if as_json else format_report(report))


datastore_app = typer.Typer(no_args_is_help=True, help="Retrieval datastores for --method rest.")
app.add_typer(datastore_app, name="datastore")


@datastore_app.command("build")
def datastore_build(
    corpus: str = typer.Argument(..., help="Corpus: a .jsonl file (one document per line) or a text file."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the datastore to."),
    model: str = MODEL_OPTION,
):
    """Tokenize a corpus with the model's tokenizer and index it (suffix array) for `rest`."""
    import os

    from .datastore import build_datastore
    from .loading import load_tokenizer
    from .hub import resolve_model

    try:
        path = resolve_model(model)
        store = build_datastore(corpus, out, load_tokenizer(path), os.path.basename(os.path.normpath(model)))
    except SpecDecodeError as e:
        fail(str(e))
        return
    print(f"{out}: {store.meta['documents']} documents, {store.meta['tokens']} tokens")


def _register_optional_commands() -> None:
    """Subcommands of other features register here (bench, serve)."""
    import importlib

    for module in ("specdecode.bench.cli", "specdecode.server.cli", "specdecode.heads.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # the feature is not there (yet)
            raise
        mod.register(app)


_register_optional_commands()
app.add_typer(tokenskip_app, name="tokenskip")  # docs/tokenskip.md
app.add_typer(whisper_app, name="whisper")  # docs/whisper.md


def main() -> None:
    app()


if __name__ == "__main__":
    main()
