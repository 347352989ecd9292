"""What every trl-distill trainer adds to its TRL parent.

- `DistillArguments`: the config fields all five configs share (`overwrite_output_dir`, `on_nonfinite`).
- `DistillTrainerMixin` (listed before the TRL trainer in the bases) gathers, one concern per module:
  - `checkpoints.CheckpointMixin`: guarded output folders, atomic saves, last complete checkpoint on resume, the
    `_save_extra_state` / `_load_extra_state` hooks;
  - `nonfinite.NonFiniteGuardMixin`: NaN/inf losses and gradients raise naming the step and term, or are skipped;
  - `model_card.ModelCardMixin`: the model card;
  and adds here what the losses share: token-level terms averaged over a whole optimizer step, TRL's `num_tokens`
  metric, and the chunked losses run as the output heads' forward (ZeRO-3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .._compat import ForwardRedirection
from .checkpoints import (  # noqa: F401  (re-exported: tests and scripts import them from here)
    STAGING_PREFIX,
    CheckpointMixin,
    check_output_dir,
    checkpoints,
    is_complete_checkpoint,
    last_complete_checkpoint,
    move_into,
    write_text_atomically,
)
from .model_card import ModelCardMixin, added_fields  # noqa: F401
from .nonfinite import NONFINITE_POLICIES, NonFiniteGuardMixin

_REDIRECT = ForwardRedirection()


@dataclass
class DistillArguments:
    r"""
    Fields shared by every trl-distill config (mixed into each, before the TRL config).

    Args:
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let a fresh `train()` write into an `output_dir` that already holds a saved model or checkpoints. By
            default that is refused before any step, so a finished run is never overwritten by accident (resume with
            `train(resume_from_checkpoint=True)` instead).
        on_nonfinite (`str`, *optional*, defaults to `"raise"`):
            What a training step does when its loss is NaN or infinite: `"raise"` stops with a `FloatingPointError`
            naming the step and the term at fault; `"skip"` logs a warning, gives the batch zero gradients and counts
            it in the `nonfinite_skipped` metric. A NaN/inf gradient behind a finite loss is handled the same way at
            the optimizer step: `"raise"` names the step and the parameters, `"skip"` drops that optimizer step (no
            parameter moves) and counts it in `nonfinite_grad_skipped`. Under fp16 the GradScaler handles overflowing
            gradients instead, as in `Trainer`.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow a fresh run to write into an output_dir holding a saved model or checkpoints."},
    )
    on_nonfinite: str = field(
        default="raise",
        metadata={"help": "On a NaN/inf training loss or gradient: 'raise' (name the step and term or parameters) "
                          "or 'skip' the batch (loss) / the optimizer step (gradient)."},
    )

    def __post_init__(self):
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"{type(self).__name__}.on_nonfinite={self.on_nonfinite!r} is not one of {NONFINITE_POLICIES}."
            )
        super().__post_init__()



def gathered_parameters(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """A context in which DeepSpeed ZeRO-3 parameters hold their whole values (each process otherwise keeps a shard);
    changes made on process `modifier_rank` are sharded back out on exit. Every process must enter it. A no-op
    context for parameters ZeRO-3 does not manage."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()



class DistillTrainerMixin(CheckpointMixin, NonFiniteGuardMixin, ModelCardMixin):
    """Shared behaviour of the trl-distill trainers; see the module docstring. Goes before the TRL trainer in the
    bases, e.g. `class OKDTrainer(DistillTrainerMixin, SFTTrainer)`."""

    @classmethod
    def _require_config(cls, args, config_class: type) -> None:
        """First line of every trainer's `__init__`: `args` must be given, and be the trainer's own config."""
        if args is None:
            raise ValueError(f"{cls.__name__} needs `args={config_class.__name__}(...)` (an output_dir at least).")
        if not isinstance(args, config_class):
            raise TypeError(f"{cls.__name__} expects a {config_class.__name__}, got {type(args).__name__}.")

    # ------------------------------------------------------------------ token-level terms of a whole optimizer step
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """`Trainer`'s count (of `labels`), plus this trainer's own token counts of the optimizer step, all processes.

        `Trainer` gathers the micro-batches of one optimizer step here before training on them, so this is the one
        place that knows how many tokens the step's token-level terms average over (SPEC: sum over completion
        tokens, divided by the completion tokens of the whole gradient-accumulated, all-process batch)."""
        counts = self._count_step_tokens(batch_samples)
        self._step_tokens = None
        if counts:
            names = sorted(counts)
            stacked = torch.stack([torch.as_tensor(counts[name], dtype=torch.float32) for name in names]).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                stacked = self.accelerator.reduce(stacked, reduction="sum")
            self._step_tokens = (self.state.global_step, dict(zip(names, stacked, strict=True)))
        return super()._get_num_items_in_batch(batch_samples, device)

    def _count_step_tokens(self, batch_samples: list) -> dict[str, torch.Tensor] | None:
        """Hook: this process's token count of each group of token-level terms (e.g. `"chosen"`) over the collated
        micro-batches of one optimizer step. None (the default): the trainer has no such terms."""
        return None

    def _token_mean(self, total: torch.Tensor, group: str, local_count) -> torch.Tensor:
        """A token-level term from `total`, its sum over this micro-batch's `local_count` tokens of `group`.

        Training: `total` over the tokens of `group` in the whole optimizer step (all micro-batches, all processes
        with `average_tokens_across_devices`), times the accumulation steps and the processes, because `Trainer`
        divides each micro-batch's loss by the former and DDP averages over the latter. So 2 x 4 accumulated equals
        a batch of 8, and 2 processes equal 1, whatever the completion lengths. Otherwise (evaluation, or a call
        outside `train()`): the mean over this micro-batch's tokens."""
        step = getattr(self, "_step_tokens", None)
        if not self.model.training or step is None or step[0] != self.state.global_step:
            return total / max(float(local_count), 1.0)
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return total * (accumulation * processes) / step[1][group].clamp(min=1).to(total.device)

    @staticmethod
    def _as_heads_forward(student_head, teacher_head, compute, *args):
        """`compute(*args)`, run as the forward of both output heads (TRL's forward redirection, nested).

        Under DeepSpeed ZeRO-3 a head's weight is a shard outside the head's own forward. The chunked losses read the
        weights directly; run this way, ZeRO-3's hooks gather both weights for `compute` and the student's again for
        its gradient in backward. Without ZeRO-3 it is a plain call. `compute` must read the weights itself."""
        return _REDIRECT(teacher_head, teacher_head, _REDIRECT, student_head, student_head, compute, *args)

    def _log_num_tokens(self, inputs: dict[str, torch.Tensor], mode: str) -> None:
        """TRL's `num_tokens` metric (tokens seen in training, all processes), for trainers whose `compute_loss`
        replaces the TRL one that logs it."""
        if mode == "train":
            seen = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._total_train_tokens += int(seen) // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
