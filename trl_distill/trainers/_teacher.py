"""The one teacher set-up of every trainer that has a teacher (GKDVariant, OKD, DistillDPO, ADPO's teacher anchor).

- `TeacherArguments`: the `teacher_*` config fields, declared, documented and validated once (mixed into each config,
  before `DistillArguments` and the TRL config).
- `TeacherTrainerMixin`: `_load_teacher` resolves the teacher (the `teacher_model` argument, else
  `teacher_model_name_or_path`), compares the tokenizer saved with a teacher given as a path or id with the student's,
  and loads it (4-bit, adapter); `_prepare_teacher` checks both output heads against the shared vocabulary, places the
  teacher (DDP/DeepSpeed) and arms the first-batch check of the teacher's mass beyond the compared columns;
  `_prepare_stored_teacher` stands in for both when the teacher was scored ahead of time (`trl_distill.offline_teacher`:
  no teacher model, its top-k come with the dataset).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import head_rows, model_name, output_head
from ..offline_teacher import stored_vocab_columns
from ..teacher import check_quantization, load_teacher
from ..vocabulary import TAIL_MASS_TOLERANCE, check_vocab_compatible, load_tokenizer, mass_beyond_columns
from ._common import gathered_parameters

logger = logging.getLogger("trl_distill")

# `adapter=` default of `_load_teacher`: the config's `teacher_adapter`.
_CONFIG_ADAPTER = object()


@dataclass
class TeacherArguments:
    r"""
    The teacher fields shared by every trl-distill config with a teacher (GKDVariant, OKD, DistillDPO, and ADPO with
    `anchor="teacher"`).

    Args:
        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Path or Hub id of the teacher, used when the trainer gets no `teacher_model` (what the CLI and YAML recipes
            use). Its saved tokenizer is compared with the student's before training; a different vocabulary stops
            the run with an error naming both models and the tokens that differ.
        teacher_model_revision (`str` or `None`, *optional*, defaults to `None`):
            Revision (branch, tag or commit) of a teacher given as a Hub id, for both its weights and its tokenizer.
        teacher_model_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is a path or id (a JSON
            string on the command line, parsed like TRL's other dict fields); dtype strings such as `"bfloat16"` work.
        teacher_quantization (`str` or `None`, *optional*, defaults to `None`):
            `"4bit"` loads the teacher's frozen base with bitsandbytes nf4 (fp32 compute on CPU, bf16 on CUDA).
        teacher_adapter (`str` or `None`, *optional*, defaults to `None`):
            Path or Hub id of a PEFT adapter loaded on the teacher, frozen (OKD's online mode trains it further).
    """

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Path or Hub id of the teacher, used when no `teacher_model` is passed."}
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a teacher given as a Hub id."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments (dict or JSON string) for the teacher's from_pretrained."}
    )
    teacher_quantization: str | None = field(
        default=None, metadata={"help": "'4bit' to load the teacher in bitsandbytes nf4, or None."}
    )
    teacher_adapter: str | None = field(
        default=None, metadata={"help": "Path or Hub id of a PEFT adapter loaded on the teacher."}
    )

    def __init_subclass__(cls, **kwargs):
        # TrainingArguments parses the JSON strings of the fields listed here (the CLI passes dicts that way).
        super().__init_subclass__(**kwargs)
        valid = getattr(cls, "_VALID_DICT_FIELDS", None)
        if valid is not None and "teacher_model_init_kwargs" not in valid:
            cls._VALID_DICT_FIELDS = [*valid, "teacher_model_init_kwargs"]

    def __post_init__(self):
        name = type(self).__name__
        check_quantization(self.teacher_quantization, f"{name}.teacher_quantization")
        super().__post_init__()
        kwargs = self.teacher_model_init_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"{name}.teacher_model_init_kwargs must be a dict or a JSON object, got {kwargs!r}.")


class TeacherTrainerMixin:
    """Trainer side of the teacher set-up; see the module docstring. Goes before `DistillTrainerMixin` in the bases."""

    _teacher_to_check: torch.nn.Module | None = None

    def _load_teacher(
        self,
        teacher_model: Any,
        args: TeacherArguments,
        processing_class: Any,
        *,
        adapter: Any = _CONFIG_ADAPTER,
        trainable_adapter: bool = False,
    ) -> torch.nn.Module:
        """The teacher, loaded: `teacher_model` (a model, a path or a Hub id) or `args.teacher_model_name_or_path`.

        A teacher given as a path or id has its saved tokenizer compared with the student's first (nothing is loaded
        for a mismatch). `adapter` defaults to `args.teacher_adapter`."""
        trainer_name = type(self).__name__
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                f"{trainer_name} needs a `teacher_model` (a model, a local path or a Hub id) or "
                f"`{type(args).__name__}.teacher_model_name_or_path`."
            )
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if isinstance(teacher_model, (str, os.PathLike)):
            if args.teacher_model_revision is not None:
                init_kwargs.setdefault("revision", args.teacher_model_revision)
            self._check_teacher_tokenizer(teacher_model, processing_class, init_kwargs)
        return load_teacher(
            teacher_model,
            quantization=args.teacher_quantization,
            adapter=args.teacher_adapter if adapter is _CONFIG_ADAPTER else adapter,
            trainable_adapter=trainable_adapter,
            model_init_kwargs=init_kwargs,
        )

    @staticmethod
    def _check_teacher_tokenizer(path: str | os.PathLike, processing_class: Any, init_kwargs: dict) -> None:
        student_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if student_tokenizer is None:
            return
        teacher_tokenizer = load_tokenizer(
            path, revision=init_kwargs.get("revision"), trust_remote_code=bool(init_kwargs.get("trust_remote_code"))
        )
        if teacher_tokenizer is None:
            logger.warning(
                f"The teacher {os.fspath(path)!r} has no saved tokenizer to compare with the student's: only the "
                "output heads are checked (sizes now, the mass beyond the shared columns on the first batch)."
            )
            return
        student_label = getattr(student_tokenizer, "name_or_path", "") or "the student's tokenizer"
        check_vocab_compatible(
            student_tokenizer,
            teacher_tokenizer,
            student_name=f"student ({student_label})",
            teacher_name=f"teacher ({os.fspath(path)})",
        )

    def _prepare_teacher(self, teacher: torch.nn.Module, *, placement: str | None = "engine") -> torch.nn.Module:
        """Check `teacher`'s head against the student's and the tokenizer, then place it; returns the placed teacher.

        Sets `self.vocab_columns` (the vocabulary columns the losses compare). `placement`: `"engine"` (a DeepSpeed
        inference engine under DeepSpeed, else accelerate's evaluation-mode placement), `"device"` (accelerate's
        placement only, for a teacher with trainable parameters), or None (the TRL parent placed it, e.g. as
        `ref_model`). When the teacher's head has more rows than the columns compared, the first batch measures the
        mass the teacher puts beyond them (see `_check_teacher_tail_mass`)."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.vocab_columns = check_vocab_compatible(tokenizer, student_model=self.model, teacher_model=teacher)
        self._teacher_to_check = teacher if head_rows(teacher) > self.vocab_columns else None
        if placement == "engine" and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if placement is not None:
            return self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return teacher

    def _prepare_stored_teacher(self, info: Any) -> None:
        """`_prepare_teacher` for a stored teacher (`trl_distill.offline_teacher`, no teacher model): the losses compare
        the vocabulary columns its log-probs were normalised over, which the student's head must cover. Sets
        `self.vocab_columns` and returns None, the trainer's `teacher_model`."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.vocab_columns = stored_vocab_columns(info, check_vocab_compatible(tokenizer, student_model=self.model))
        return None

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self._teacher_to_check is not None and isinstance(inputs, dict) and "input_ids" in inputs:
            self._check_teacher_tail_mass(inputs["input_ids"], inputs.get("attention_mask"))
        return inputs

    def _check_teacher_tail_mass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Once, on the first batch: raise if the teacher puts a non-negligible mass on output rows the losses drop.

        A head padded past the tokenizer (real checkpoints pad to a multiple of 64 or 128) carries ~0 there; a head
        whose extra rows are real tokens the student's tokenizer lacks does not, and comparing only the shared
        columns would silently renormalise the teacher without them."""
        teacher, self._teacher_to_check = self._teacher_to_check, None
        columns = self.vocab_columns
        head = output_head(teacher) if _has_plain_head(teacher) else None
        parameters = [p for p in (head.weight, head.bias) if p is not None] if head is not None else []
        with gathered_parameters(parameters):  # whole head weights under ZeRO-3 (every process enters)
            mass = mass_beyond_columns(teacher, input_ids, attention_mask, columns).to(self.accelerator.device)
        worst = self.accelerator.gather(mass.max().reshape(1) if mass.numel() else mass.new_zeros(1)).max().item()
        if worst <= TAIL_MASS_TOLERANCE:
            return
        mean = self.accelerator.gather(mass.mean().reshape(1) if mass.numel() else mass.new_zeros(1)).mean().item()
        rows = head_rows(teacher)
        raise ValueError(
            f"{type(self).__name__}: the teacher ({model_name(teacher)}) has {rows} output rows but only the first "
            f"{columns} are compared with the student; on the first batch it puts up to {worst:.2%} of its probability "
            f"(mean {mean:.2%}) on the other {rows - columns} rows, which the losses would drop (tolerance "
            f"{TAIL_MASS_TOLERANCE:g}). Its head scores tokens the student's vocabulary lacks: distil from a teacher "
            "that shares the student's tokenizer (pass it as a path or id to have the two tokenizers compared). "
            "Padding rows of a trained checkpoint carry ~0 and pass."
        )


def _has_plain_head(model: torch.nn.Module) -> bool:
    try:
        output_head(model)
    except (NotImplementedError, TypeError):
        return False
    return True
