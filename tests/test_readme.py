"""The README's two set-up commands are what CI runs, word for word (.ci/run)."""

from __future__ import annotations

import re

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_ci_runs_the_readme_commands_exactly():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    main, tests = commands
    assert "specdecode bench" in main and "pytest" in tests
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    # Tests first, then the main job, each exactly as the README writes it.
    assert tests in ci and main in ci, (commands, ci)
    assert ci.index(tests) < ci.index(main)
    assert "python3 -m venv .ci-venv" in ci  # in a fresh virtual environment
