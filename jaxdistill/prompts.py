"""pCoT (the student's prompt) and pTeacher (the same plus the reference solution as a hint).

Style "chat" (instruction-tuned models): both are built from the same messages and rendered
by the model's own chat template; the only difference is the hint block inserted into the
last user turn, so a template mismatch between the two cannot creep in. The reply ends at
the end-of-turn token.

Style "fewshot" (base models): worked examples ("Problem: ...\nSolution:\n...\n\n") then the
problem; pTeacher adds the reference solution before "Solution:". The reply ends at the
blank line that separates examples (the "\n\n" token), which `stop_ids` adds to the stops.
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
    style: str = "chat"  # chat | fewshot
    examples: tuple[tuple[str, str], ...] = ()  # fewshot: (problem, solution) worked examples
    fewshot_hint: str = "Reference solution (a hint: solve the problem yourself):\n{solution}\n"

    def __post_init__(self):
        if self.style not in ("chat", "fewshot"):
            raise ValueError(f"prompts.style must be 'chat' or 'fewshot', got {self.style!r}.")


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
    """Token ids of (pCoT, pTeacher), each ending where the reply starts (the assistant-turn
    opener, or "Solution:\n")."""
    if config.style == "fewshot":
        block = "".join(f"Problem: {p}\nSolution:\n{s}\n\n" for p, s in config.examples)
        hint = config.fewshot_hint.format(solution=record.solution)
        return (tokenizer.encode(f"{block}Problem: {record.problem}\nSolution:\n"),
                tokenizer.encode(f"{block}Problem: {record.problem}\n{hint}Solution:\n"))
    return tokenizer.chat(student_messages(record, config)), tokenizer.chat(teacher_messages(record, config))


def _blank_line_id(tokenizer) -> int:
    ids = tokenizer.encode("\n\n", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError("prompts.style='fewshot' ends replies at a blank line, but this tokenizer has no single "
                         "'\\n\\n' token; use style='chat'.")
    return ids[0]


def stop_ids(tokenizer, config: PromptConfig = PromptConfig()) -> tuple[int, ...]:
    """The tokens that end a reply: the model's end tokens, and for fewshot the blank line."""
    extra = (_blank_line_id(tokenizer),) if config.style == "fewshot" else ()
    return tuple(sorted(set(tokenizer.eos_ids) | set(extra)))


def end_id(tokenizer, config: PromptConfig = PromptConfig()) -> int:
    """The token that closes a reference reply (SFT targets, empty samples)."""
    return _blank_line_id(tokenizer) if config.style == "fewshot" else tokenizer.turn_end_id
