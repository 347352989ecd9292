"""Early checks of the data a trainer is given, run in each trainer's `__init__` before TRL tokenizes anything.

Every error names the trainer, the dataset (`train_dataset`, `eval_dataset`, `eval_dataset['name']`), the column and,
for a bad row, its index, so a wrong dataset fails at construction instead of as a `KeyError` or a shape error deep
inside TRL, transformers or torch during the first training step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from datasets import Dataset

# Columns holding text a trainer learns from: an empty one leaves nothing to train on (or a zero-length sequence).
COMPLETION_COLUMNS = ("messages", "completion", "chosen", "rejected", "completions")

SFT_FORMATS = (("messages",), ("prompt", "completion"), ("text",), ("input_ids",))
PREFERENCE_FORMATS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


def named_datasets(train_dataset: Any, eval_dataset: Any) -> Iterator[tuple[str, Any]]:
    """(name, dataset) for the train dataset and each eval dataset (a dict of them too) that is given."""
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            yield f"eval_dataset[{key!r}]", dataset
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def _first_row(dataset: Any) -> dict[str, Any] | None:
    try:
        return next(iter(dataset))
    except StopIteration:
        return None


def column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)  # None for some IterableDatasets
    if names is None:
        names = list(_first_row(dataset) or {})
    return list(names)


def _fmt(columns: Sequence[str]) -> str:
    return " + ".join(f"`{c}`" for c in columns)


def require_columns(dataset: Any, formats: Sequence[Sequence[str]], trainer_name: str, dataset_name: str,
                    hint: str = "") -> tuple[str, ...]:
    """Check that `dataset` has every column of one of `formats` (alternatives, in order of preference).

    Returns the first format it matches. Otherwise raises ValueError naming the missing columns of the closest
    format (the one sharing most columns with the dataset) and listing every accepted format.
    """
    present = column_names(dataset)
    for columns in formats:
        if all(column in present for column in columns):
            return tuple(columns)
    closest = max(formats, key=lambda columns: sum(column in present for column in columns))
    missing = [column for column in closest if column not in present]
    accepted = "; ".join(_fmt(columns) for columns in formats)
    raise ValueError(
        f"{trainer_name}: {dataset_name} has columns {present} but no {_fmt(missing)} column "
        f"(missing for the {_fmt(closest)} format). Accepted column sets: {accepted}.{' ' + hint if hint else ''}"
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts
        return "".join(part.get("text") or "" if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_empty(value: Any, column: str) -> bool:
    """Whether a completion holds no text: an empty string, or messages whose (assistant) content is all blank."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        if not value:
            return True
        if _is_message_list(value):
            if column == "messages":  # the whole conversation: its assistant turns (if any) are the completion
                value = [m for m in value if m.get("role") == "assistant"] or value
            return not any(_content_text(m.get("content")).strip() for m in value)
    return False


def _rows(dataset: Any, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows restricted to `columns`: all of a `Dataset` (read in batches), the first of an `IterableDataset`."""
    if isinstance(dataset, Dataset):
        offset = 0
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            size = len(batch[columns[0]])
            for i in range(size):
                yield offset + i, {column: batch[column][i] for column in columns}
            offset += size
    else:
        row = _first_row(dataset)
        if row is not None:
            yield 0, {column: row[column] for column in columns}


def check_rows(dataset: Any, trainer_name: str, dataset_name: str, min_completions: int = 2) -> None:
    """Reject rows with an empty completion, listwise rows with fewer than `min_completions` completions, and
    listwise rows whose `rewards` list is not as long as their `completions` list."""
    present = column_names(dataset)
    columns = [c for c in COMPLETION_COLUMNS if c in present]
    listwise = "completions" in present
    if listwise and "rewards" in present:
        columns.append("rewards")
    if not columns:
        return
    where = f"{trainer_name}: {dataset_name} row"
    for index, row in _rows(dataset, columns):
        for column in columns:
            value = row[column]
            if column == "rewards":
                if value is not None and len(value) != len(row["completions"] or []):
                    raise ValueError(
                        f"{where} {index}: `rewards` has {len(value)} values for {len(row['completions'] or [])} "
                        "`completions` (one reward per completion)."
                    )
            elif column == "completions":
                if value is None or len(value) < min_completions:
                    raise ValueError(
                        f"{where} {index}: `completions` has {0 if value is None else len(value)} entries; a listwise "
                        f"row needs at least {min_completions} completions to rank."
                    )
                for position, completion in enumerate(value):
                    if _is_empty(completion, column):
                        raise ValueError(f"{where} {index}: `completions`[{position}] is empty.")
            elif _is_empty(value, column):
                raise ValueError(f"{where} {index}: `{column}` is empty (no completion text to learn from).")


def _is_conversational_row(row: dict[str, Any]) -> bool:
    for column in ("messages", "prompt", "completion", "chosen", "rejected"):
        if _is_message_list(row.get(column)):
            return True
    completions = row.get("completions")
    return isinstance(completions, list) and any(_is_message_list(c) for c in completions)


def require_chat_template(processing_class: Any, dataset: Any, trainer_name: str, dataset_name: str) -> None:
    """A conversational dataset is rendered with the tokenizer's chat template: it must have one."""
    if processing_class is None:
        return
    row = _first_row(dataset)
    if row is None or not _is_conversational_row(row):
        return
    tokenizer = getattr(processing_class, "tokenizer", None)
    templates = [getattr(processing_class, "chat_template", None), getattr(tokenizer, "chat_template", None)]
    if not any(templates):
        raise ValueError(
            f"{trainer_name}: {dataset_name} is conversational (lists of role/content messages) but the "
            f"processing_class ({type(processing_class).__name__}) has no chat template: set "
            "`tokenizer.chat_template`, or give the data as plain text."
        )


def validate_datasets(trainer_name: str, processing_class: Any, train_dataset: Any, eval_dataset: Any,
                      formats: Sequence[Sequence[str]] | None, hint: str = "") -> None:
    """Columns (`formats`, or no column check with None), rows and chat template of every dataset given."""
    for dataset_name, dataset in named_datasets(train_dataset, eval_dataset):
        if formats is not None:
            require_columns(dataset, formats, trainer_name, dataset_name, hint)
        check_rows(dataset, trainer_name, dataset_name)
        require_chat_template(processing_class, dataset, trainer_name, dataset_name)
