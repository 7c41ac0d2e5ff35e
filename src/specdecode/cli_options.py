"""What the command-line tools share: failing with one clear line, ``-o key=value`` parsing,
and the options of the commands that load an engine.

``cli`` (generate, tune, doctor, ...), ``bench.cli`` and ``server.cli`` all import from here;
nothing here imports them, so the feature commands never reach back into the top-level CLI.
"""

from __future__ import annotations

import json

import typer

from .drafters import registry


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def method_options(options: list[str] | None) -> dict:
    """``--option key=value`` pairs -> keyword arguments (values parsed as JSON when they can be)."""
    out = {}
    for item in options or []:
        if "=" not in item:
            fail(f"--option: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


_WITH_DRAFT_MODEL = ", ".join(registry.names(draft_model=True))

# Options shared by the commands that load an engine (generate, serve; some also by tune,
# doctor, bench and datastore build).
MODEL_OPTION = typer.Option("smollm2-135m", "--model", "-m", help="Model folder or known name.")
METHOD_OPTION = typer.Option(
    "vanilla", help=f"Decoding method: {', '.join(registry.REGISTRY)}; "
    "A+B: B where A has no draft (pld+quant); auto: per request, the fastest so far of -o arms=...",
)  # fmt: skip
DRAFT_MODEL_OPTION = typer.Option(None, help=f"Draft model for --method {_WITH_DRAFT_MODEL}.")
DRAFT_LENGTH_OPTION = typer.Option(None, help="Tokens drafted per step (method default if unset).")
ADAPTIVE_OPTION = typer.Option(
    None, "--adaptive/--fixed",
    help="Draft sizing. Default: by expected payoff under the target's measured cost curve (a plain step when "
    "no draft pays). --adaptive: grow by 2 after a fully accepted draft, shrink by 1 otherwise. --fixed: always "
    "--draft-length (also the default when --draft-length is given).",
)  # fmt: skip
METHOD_OPTIONS_OPTION = typer.Option(None, "--option", "-o", help="Method option key=value (repeatable).")
DTYPE_OPTION = typer.Option("auto", help="auto, float32, bfloat16 or float16.")
BACKEND_OPTION = typer.Option("auto", help="auto (native when supported), native or hf.")
DEVICE_OPTION = typer.Option("cpu", help="cpu, cuda, cuda:1, ...")
QUANTIZE_OPTION = typer.Option(
    None, help="Serve the model itself quantized, weight-only: int4, int4-gN (N = 32, 64, 128, 256) or int8. "
    "Output is then exact against the quantized model, not the original (native backend)."
)
DRAFT_QUANT_OPTION = typer.Option(None, help=f"Quantize the --draft-model of {_WITH_DRAFT_MODEL}: int4, int4-gN or int8.")
VERIFY_OPTION = typer.Option(
    "exact", help="Acceptance rule: exact (lossless), or specdec (LOSSY, greedy only; -o beta=3 -o tau=1.0)."
)

# TokenSkip (docs/tokenskip.md): a LoRA adapter merged into --model at load; -o cot_ratio=0.6 writes the ratio into the prompt.
ADAPTER_OPTION = typer.Option(
    None, help="A LoRA adapter folder (peft), merged into --model at load (cached); with -o cot_ratio=G the prompt "
    "asks a TokenSkip adapter for a chain of thought G times as long. See docs/tokenskip.md.",
)  # fmt: skip
