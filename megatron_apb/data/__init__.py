"""Generated prompts, shared by the accuracy suite (:mod:`megatron_apb.eval`) and
retaining-head training (:mod:`megatron_apb.training.data`).

* :mod:`.prompts`: ``document ‖ query`` to token ids; the built-in pass-key prompt;
* :mod:`.material`: filler text, essays and word lists from offline packages;
* :mod:`.generators`: the RULER-style task makers, fitted to a token budget;
* :mod:`.tasks`: the task table, :class:`TaskSample`, scoring, JSONL files.

Nothing here imports Megatron-Core or transformers (a tokenizer is passed in), so
generating tasks stays cheap.
"""

from .prompts import PASSKEY_QUESTION, TokenizedPrompt, passkey_prompt, tokenize_prompt
from .tasks import TASKS, TaskSample, TaskSpec, generate_samples, parse_tasks, read_samples, score_answer, write_samples

__all__ = [
    "PASSKEY_QUESTION", "TokenizedPrompt", "passkey_prompt", "tokenize_prompt",
    "TASKS", "TaskSample", "TaskSpec", "generate_samples", "parse_tasks", "read_samples",
    "score_answer", "write_samples",
]
