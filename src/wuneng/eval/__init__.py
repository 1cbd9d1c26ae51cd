"""Evaluation: synthetic tasks (MQAR, state tracking, passkey, arithmetic), scorers, perplexity,
greedy generation, a task registry, and a local lm-evaluation-harness task (``lm_eval_tasks``)."""

from wuneng.eval.generation import generate_text, greedy_generate
from wuneng.eval.perplexity import PerplexityResult, perplexity
from wuneng.eval.registry import TASKS, TaskSpec, get_task, list_tasks

__all__ = [
    "TASKS",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "perplexity",
    "PerplexityResult",
    "greedy_generate",
    "generate_text",
]
