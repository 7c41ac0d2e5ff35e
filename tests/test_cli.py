"""The CLI is a thin layer over the API: same output, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from specdecode import Engine
from specdecode.cli import app

runner = CliRunner()


def test_generate_json_equals_api(stories_path):
    res = runner.invoke(app, ["generate", "-m", str(stories_path), "--method", "pld", "-p", "Once upon a time",
                              "--max-new-tokens", "30", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    ref = Engine.from_pretrained(stories_path, progress=False).generate("Once upon a time", max_new_tokens=30)
    assert out["token_ids"] == ref.token_ids
    assert out["text"] == ref.text
    assert out["stats"]["new_tokens"] == 30


def test_generate_prints_text_and_summary(stories_path):
    res = runner.invoke(app, ["generate", "-m", str(stories_path), "--method", "sps", "--draft-model", str(stories_path),
                              "-p", "Once upon a time", "--max-new-tokens", "20", "-o", "unused=1"])  # fmt: skip
    assert res.exit_code == 2  # sps takes no option 'unused'
    assert "method_options" in res.output
    res = runner.invoke(app, ["generate", "-m", str(stories_path), "--method", "sps", "--draft-model", str(stories_path),
                              "-p", "Once upon a time", "--max-new-tokens", "20"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mean accepted tokens" in res.output and "tok/s" in res.output


def test_errors_are_one_clear_line(stories_path):
    cases = [
        (["generate", "-m", "/no/such/model", "-p", "hi"], "neither a folder"),
        (["generate", "-m", str(stories_path), "-p", "hi", "--method", "nope"], "method:"),
        (["generate", "-m", str(stories_path), "-p", "hi", "--max-new-tokens", "0"], "max_new_tokens:"),
        (["generate", "-m", str(stories_path), "-p", "hi", "--temperature", "-1"], "temperature:"),
        (["generate", "-m", str(stories_path), "-p", "", ], "prompt:"),
        (["pull", "not-a-model"], "unknown model"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_shared_options_live_below_the_commands():
    """cli, bench.cli and server.cli take their shared pieces from cli_options, which imports none of them."""
    import ast
    import inspect

    import specdecode.bench.cli as bench_cli
    import specdecode.cli as cli
    import specdecode.cli_options as options
    import specdecode.server.cli as server_cli

    assert cli.fail is options.fail is bench_cli.fail is server_cli.fail
    assert cli.method_options is options.method_options is server_cli.method_options
    assert server_cli.serve.__defaults__[0] is options.MODEL_OPTION
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(options))) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"cli", "bench", "server", "bench.cli", "server.cli"}, imported
    assert options.method_options(["max-ngram=4", "name=x"]) == {"max_ngram": 4, "name": "x"}
