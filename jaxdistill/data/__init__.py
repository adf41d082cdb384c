"""Data sources for the distillation jobs: synthetic tasks, JSONL files, TFDS.

`load_records(config)` returns (train, eval) lists of `Record`s; `config.source` picks:
- "synthetic": generated problems (knobs: steps, max_start, max_operand), the default;
- "conversations": generated conversations where the user revises a request under
  constraints and accepts the last reply (no exact answer; checks for evaluation);
- "jsonl": `train_path` and `eval_path` (GSM8K, generic or conversation form);
- "tfds": `tfds_name` (gsm8k) from `tfds_data_dir`, already prepared by the user.
"""

from __future__ import annotations

from jaxdistill.data.conversations import conversation_records
from jaxdistill.data.records import DataError, Record, extract_answer, iter_tfds, parse_record, read_jsonl
from jaxdistill.data.synthetic import TEST_WINDOW, SyntheticConfig, synthetic_records
from jaxdistill.errors import ConfigError

__all__ = ["DataError", "Record", "SyntheticConfig", "conversation_records", "extract_answer", "load_records",
           "read_jsonl", "synthetic_records", "tfds_records"]


def tfds_records(name: str, split: str, data_dir: str | None, limit: int = 0) -> list[Record]:
    """Records of a prepared TFDS dataset in GSM8K form, read through tfds.data_source."""
    return [parse_record(raw, where, uid=f"{name}-{split}-{i}") for where, i, raw in iter_tfds(name, split, data_dir,
                                                                                                limit)]


def load_records(config) -> tuple[list[Record], list[Record]]:
    source = config.source
    if source == "synthetic":
        task = SyntheticConfig(steps=config.steps, max_start=config.max_start, max_operand=config.max_operand)
        return (synthetic_records(config.train_size, config.seed, task, "train",
                                  held_out=max(config.eval_size, TEST_WINDOW)),
                synthetic_records(config.eval_size, config.seed, task, "test"))
    if source == "conversations":
        return (conversation_records(config.train_size, config.seed, "train"),
                conversation_records(config.eval_size, config.seed, "test"))
    if source == "jsonl":
        if not config.get("train_path"):
            raise ConfigError("data.source='jsonl' reads --config.data.train_path=<file.jsonl> (and optionally "
                              "--config.data.eval_path=<file.jsonl>); train_path is not set.")
        train = read_jsonl(config.train_path)
        if config.get("eval_path"):
            evaluation = read_jsonl(config.eval_path)
        else:  # hold out the last eval_size records, so evaluation never sees a training record
            held_out = config.eval_size or max(1, len(train) // 10)
            if held_out >= len(train):
                raise ConfigError(f"{config.train_path} has {len(train)} records, too few to hold out "
                                  f"data.eval_size={held_out} for evaluation; set data.eval_path or lower eval_size.")
            train, evaluation = train[:-held_out], train[-held_out:]
        return train, evaluation[: config.eval_size] if config.eval_size else evaluation
    if source == "tfds":
        if not config.get("tfds_name"):
            raise ConfigError("data.source='tfds' needs --config.data.tfds_name (e.g. gsm8k).")
        return (tfds_records(config.tfds_name, "train", config.get("tfds_data_dir") or None,
                             config.get("train_size", 0)),
                tfds_records(config.tfds_name, "test", config.get("tfds_data_dir") or None, config.eval_size))
    raise ConfigError(f"data.source {source!r} is not one of 'synthetic', 'conversations', 'jsonl', 'tfds'.")
