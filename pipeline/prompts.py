"""How a record becomes a prompt and a target continuation (shared by training and evaluation).

Training sequence = prompt + target continuation (+ EOS); the loss is masked to the continuation.
Label scoring compares the log-likelihood of each label's continuation after the same prompt.
"""

from __future__ import annotations

ANSWER_CUE = "Answer:"


def format_prompt(instruction: str, text: str) -> str:
    """instruction, the input, and the answer cue; the model continues with ' <target>'."""
    instruction = instruction.strip()
    text = text.strip()
    return f"{instruction}\n\nInput: {text}\n{ANSWER_CUE}" if instruction else f"Input: {text}\n{ANSWER_CUE}"


def target_continuation(target: str) -> str:
    """The text that follows the prompt: a space, then the target (label word or free-form answer)."""
    return " " + target.strip()
