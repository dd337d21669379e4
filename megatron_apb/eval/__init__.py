"""The accuracy suite: RULER-style task generators, scoring, the runner and reports."""

from .report import markdown_report, summarize
from .runner import EvalMethod, eval_methods, evaluate
from .tasks import TASKS, TaskSample, generate_samples, parse_tasks, read_samples, score_answer, write_samples

__all__ = [
    "TASKS", "EvalMethod", "TaskSample", "eval_methods", "evaluate", "generate_samples",
    "markdown_report", "parse_tasks", "read_samples", "score_answer", "summarize", "write_samples",
]
