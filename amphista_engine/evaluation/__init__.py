"""Evaluation and latency tooling: `amphista eval` (Spec-Bench-format runner), `amphista bench` (step latency,
break-even tau), their plots, and random-weight model shapes for timing large targets without their weights."""
from .bench import run_bench
from .questions import read_questions
from .runner import run_eval, summarize

__all__ = ["run_eval", "run_bench", "read_questions", "summarize"]
