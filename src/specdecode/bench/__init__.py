"""Spec-Bench harness: ``specdecode bench`` runs our methods and transformers' own side by side
on Spec-Bench's six subtasks and reports speedup, tokens/s and mean accepted tokens.

Modules: questions (the question file and subtasks), conversation (multi-turn prompts),
methods and peers (how each method answers a turn), worker (one model, timed turns), answers
(Spec-Bench answer files, resume, shards), runner (the run), scale (Ray), metrics, report and
plots, cli.
"""

from .metrics import summarize
from .methods import MethodSpec, parse_methods
from .questions import SUBTASKS, Question, load_questions, select
from .report import build_report
from .runner import BenchOutcome, run_bench
from .worker import BenchConfig

__all__ = [
    "SUBTASKS",
    "BenchConfig",
    "BenchOutcome",
    "MethodSpec",
    "Question",
    "build_report",
    "load_questions",
    "parse_methods",
    "run_bench",
    "select",
    "summarize",
]
