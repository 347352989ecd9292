"""Vocabulary checks between a student and a teacher: tokenizers mapping the same tokens to the same ids, output heads
covering the tokenizer (padded heads accepted), and the probability a teacher puts on head rows beyond the columns
the losses compare."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .models import backbone_hidden_states, causal_lm, head_rows, model_name, output_head

__all__ = ["TAIL_MASS_TOLERANCE", "check_vocab_compatible", "load_tokenizer", "mass_beyond_columns"]


def _tokenizer_size(tokenizer: Any) -> int:
    """Rows a head needs to cover the tokenizer: its length, or its largest id + 1 if ids have gaps."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def _vocab_difference(student: dict[str, int], teacher: dict[str, int], limit: int = 5) -> list[str]:
    missing = float("inf")
    differing = sorted(
        (token for token in student.keys() | teacher.keys() if student.get(token) != teacher.get(token)),
        key=lambda token: (student.get(token, missing), teacher.get(token, missing), token),
    )
    return [f"{tok!r}: {student.get(tok, 'absent')} vs {teacher.get(tok, 'absent')}" for tok in differing[:limit]]


def _role_name(role: str, model: torch.nn.Module | None) -> str:
    return role if model is None else f"{role} ({model_name(model)})"


def check_vocab_compatible(
    student_tokenizer: Any,
    teacher_tokenizer: Any = None,
    *,
    student_model: torch.nn.Module | None = None,
    teacher_model: torch.nn.Module | None = None,
    student_name: str | None = None,
    teacher_name: str | None = None,
) -> int:
    """Check that student and teacher share a vocabulary; return how many vocabulary columns losses compare.

    Tokenizers, when both are given, must map the same tokens to the same ids. Output heads may be padded past
    the tokenizer (real checkpoints pad to a multiple of 64 or 128) but each must cover it. Without any tokenizer
    the heads must have equal sizes. Returns ``min(student head rows, teacher head rows)`` (at least the
    tokenizer's size), or the tokenizer's size when no model is given. Raises ValueError naming the models
    (by default "student (<name_or_path>)" and "teacher (<name_or_path>)").
    """
    student_name = student_name or _role_name("student", student_model)
    teacher_name = teacher_name or _role_name("teacher", teacher_model)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            examples = "; ".join(_vocab_difference(student_vocab, teacher_vocab))
            raise ValueError(
                f"The {student_name} and {teacher_name} models do not share a vocabulary: the {student_name} "
                f"tokenizer has {len(student_tokenizer)} tokens, the {teacher_name} tokenizer "
                f"{len(teacher_tokenizer)}; tokens whose ids differ ({student_name} vs {teacher_name}): {examples}. "
                "Distillation compares the two distributions token by token, so both need the same tokenizer "
                "(an output head padded to a larger size is fine)."
            )
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    needed = None if tokenizer is None else _tokenizer_size(tokenizer)

    models = ((student_name, student_model), (teacher_name, teacher_model))
    heads = [(label, head_rows(model)) for label, model in models if model is not None]
    for label, rows in heads:
        if needed is not None and rows < needed:
            raise ValueError(
                f"The {label} model's output head has {rows} rows but the tokenizer has {needed} tokens: it cannot "
                f"score every token, so the {student_name} and {teacher_name} vocabularies are not compatible."
            )
    if needed is None and len(heads) == 2 and heads[0][1] != heads[1][1]:
        raise ValueError(
            f"The {student_name} ({heads[0][1]} vocabulary rows) and {teacher_name} ({heads[1][1]} rows) models have "
            "different vocabulary sizes. Pass their tokenizers so a head that is only padded larger can be accepted."
        )
    if heads:
        return min(rows for _, rows in heads)
    if needed is None:
        raise ValueError("check_vocab_compatible needs at least one tokenizer or one model.")
    return needed


def load_tokenizer(path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model at `path` (a local folder or a Hub id), or None when there is none to load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer files, or a tokenizer class it cannot build
        return None


# The largest probability a teacher may put on output rows beyond the compared columns, at any attended position of
# the first batch. Padding rows of a trained checkpoint (never a target) carry far less; rows of real tokens that the
# student's tokenizer lacks carry far more.
TAIL_MASS_TOLERANCE = 1e-3


@torch.no_grad()
def mass_beyond_columns(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, columns: int, chunk_size: int = 256
) -> Tensor:
    """The probability `model` puts on its output rows `columns:` at each attended position, as a flat ``[N]`` tensor.

    Distillation compares only the first `columns` vocabulary columns, so a teacher whose head is larger loses this
    mass silently. Computed from the backbone's hidden states, `chunk_size` positions at a time (no full logits);
    models that transform their logits after the head (soft-capping) use their logits instead.
    """
    positions = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    try:
        rows = backbone_hidden_states(model, input_ids, attention_mask)[positions]
        head = output_head(model)
        weight, bias = head.weight, head.bias

        def project(chunk: Tensor) -> Tensor:
            return torch.nn.functional.linear(chunk.to(weight.dtype), weight, bias)
    except (NotImplementedError, TypeError):  # soft-capped or scaled logits, a quantized or adapted head
        rows = causal_lm(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[positions]

        def project(chunk: Tensor) -> Tensor:
            return chunk

    masses = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = project(rows[start : start + chunk_size]).float()
        # 1 - p(first columns) = -expm1(lse(first columns) - lse(all)), exact for tiny masses.
        masses.append(-torch.expm1(logits[:, :columns].logsumexp(-1) - logits.logsumexp(-1)))
    return torch.cat(masses) if masses else rows.new_zeros(0, dtype=torch.float32)
