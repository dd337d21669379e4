"""The accuracy suite: RULER-style task generators, scoring, the runner and reports.

Names are imported on first use (the runner needs Megatron-Core; generating and scoring
tasks does not).
"""


from .._lazy import lazy_getattr

_EXPORTS = {
    "TASKS": ".tasks", "TaskSample": ".tasks", "generate_samples": ".tasks", "parse_tasks": ".tasks",
    "read_samples": ".tasks", "score_answer": ".tasks", "write_samples": ".tasks",
    "markdown_report": ".report", "summarize": ".report",
    "EvalMethod": ".runner", "eval_methods": ".runner", "evaluate": ".runner",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
