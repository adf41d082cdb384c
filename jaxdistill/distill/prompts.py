"""pCoT (the student's prompt) and pTeacher (the same plus the reference solution as a hint).

Both are built from the same messages and rendered by the model's own chat template; the
only difference is the hint block inserted into the last user turn, so a template mismatch
between the two cannot creep in.
"""

from __future__ import annotations

import dataclasses

from jaxdistill.data.records import Record


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    instruction: str = "Solve the problem step by step. Write the final answer on the last line as '#### <answer>'."
    hint: str = (
        "Here is a reference solution. Use it only as a hint: solve the problem normally, in your own words, "
        "without mentioning the reference.\nReference solution:\n{solution}"
    )
    system: str = ""


def _messages(record: Record, config: PromptConfig, hint: bool) -> list[dict]:
    messages = [{"role": "system", "content": config.system}] if config.system else []
    messages += [{"role": role, "content": content} for role, content in record.history]
    parts = [record.problem]
    if hint:
        parts.append(config.hint.format(solution=record.solution))
    if record.answer is not None and config.instruction:
        parts.append(config.instruction)
    messages.append({"role": "user", "content": "\n\n".join(parts)})
    return messages


def student_messages(record: Record, config: PromptConfig = PromptConfig()) -> list[dict]:
    return _messages(record, config, hint=False)


def teacher_messages(record: Record, config: PromptConfig = PromptConfig()) -> list[dict]:
    return _messages(record, config, hint=True)


def prompt_pair(tokenizer, record: Record, config: PromptConfig = PromptConfig()) -> tuple[list[int], list[int]]:
    """Token ids of (pCoT, pTeacher), each ending with the assistant-turn opener."""
    return tokenizer.chat(student_messages(record, config)), tokenizer.chat(teacher_messages(record, config))
