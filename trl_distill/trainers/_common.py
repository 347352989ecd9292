"""What every trl-distill trainer adds to its TRL parent, in one place.

- `DistillArguments`: the config fields all five configs share (`overwrite_output_dir`, `on_nonfinite`).
- `DistillTrainerMixin` (listed before the TRL trainer in the bases):
  - a fresh `train()` refuses an `output_dir` that already holds a saved model or checkpoints, and
    `resume_from_checkpoint=True` picks the last *complete* checkpoint (a killed save leaves an incomplete one);
  - `_save` writes into a staging folder and moves each file into place with `os.replace`, so a crash mid-save
    leaves the previous file or the new one, never a truncated one;
  - `_check_finite(loss, model)`: a non-finite loss raises `FloatingPointError` naming the step and the first
    non-finite term, or (with `on_nonfinite="skip"`) turns the batch into a zero-gradient no-op;
  - `_get_grad_norm`: a NaN/inf gradient behind a finite loss (student or extra trainable parameters, checked
    before the optimizer step) raises naming the step and the parameters, or skips the optimizer step;
  - `create_model_card`: a card naming the method, teacher, student base, hyperparameters, results and citations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData

from .._compat import ForwardRedirection
from ..teacher import model_name as describe_model

logger = logging.getLogger("trl_distill")
_REDIRECT = ForwardRedirection()

NONFINITE_POLICIES = ("raise", "skip")

# Files `save_pretrained` writes at the top of a folder holding a finished model (full weights or an adapter).
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last in every checkpoint
STAGING_PREFIX = "_incomplete-save-"  # "_*" is in Trainer.push_to_hub's ignore patterns
NUM_TOKENS_NAME = "num_tokens.json"  # TRL's running `num_tokens` total, which transformers' checkpoints omit

TRL_CITATION = """\
@software{vonwerra2020trl,
    title   = {{TRL: Transformers Reinforcement Learning}},
    author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
    license = {Apache-2.0},
    url     = {https://github.com/huggingface/trl},
    year    = {2020}
}"""


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


def added_fields(config: type) -> list:
    """The dataclass fields trl-distill declares (on the config and its `DistillArguments`), not TRL's."""
    names = {
        name
        for base in config.__mro__
        if base.__module__.startswith("trl_distill")
        for name in vars(base).get("__annotations__", {})
    }
    return [f for f in fields(config) if f.name in names]


# ---------------------------------------------------------------------------------------------- output folders
def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint is complete once its trainer state (written after the weights and optimizer) parses."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [path for _, path in sorted(found)]


def gathered_parameters(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """A context in which DeepSpeed ZeRO-3 parameters hold their whole values (each process otherwise keeps a shard);
    changes made on process `modifier_rank` are sharded back out on exit. Every process must enter it. A no-op
    context for parameters ZeRO-3 does not manage."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint; newer incomplete ones (a run killed while saving) are skipped with a warning."""
    for path in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        logger.warning(f"Skipping {path}: it has no readable {TRAINER_STATE_NAME} (the save was interrupted).")
    return None


def check_output_dir(output_dir: str, *, overwrite: bool, trainer_name: str) -> None:
    """Refuse to start a fresh run over a saved model or checkpoints, unless `overwrite`."""
    if overwrite or not os.path.isdir(output_dir):
        return
    found = [name for name in MODEL_FILES if os.path.isfile(os.path.join(output_dir, name))]
    found += [os.path.basename(path) for path in checkpoints(output_dir)]
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(
            f"{trainer_name}: output_dir {output_dir!r} already holds a saved run ({shown}); training from scratch "
            "would overwrite it. Resume with `trainer.train(resume_from_checkpoint=True)` (CLI: "
            "`--resume_from_checkpoint true`), pick another output_dir, or set `overwrite_output_dir=True`."
        )


def move_into(staging: str, output_dir: str) -> None:
    """Move every entry of `staging` into `output_dir`: files with `os.replace` (atomic on one filesystem), folders
    (e.g. `teacher_adapter/`) swapped whole, so readers see the old folder or the new one."""
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source):
            previous = None
            if os.path.exists(target):
                previous = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
                os.replace(target, os.path.join(previous, name))
            os.replace(source, target)
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(source, target)


def write_text_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ---------------------------------------------------------------------------------------------- model card
def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
    return "-" if value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_format_value(value).replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)


def _hub_id(name: str | None) -> str | None:
    """A Hub id (`org/name` or `name`) as opposed to a local path; only those go in the card's `base_model`."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith("."):
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def _versions(peft: bool) -> list[tuple[str, str]]:
    import datasets
    import tokenizers
    import transformers
    import trl

    from .. import __version__

    rows = [
        ("trl-distill", __version__),
        ("TRL", trl.__version__),
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
        ("Datasets", datasets.__version__),
        ("Tokenizers", tokenizers.__version__),
    ]
    if peft:
        import peft as peft_module

        rows.append(("PEFT", peft_module.__version__))
    return rows


class DistillTrainerMixin:
    """Shared behaviour of the trl-distill trainers; see the module docstring. Goes before the TRL trainer in the
    bases, e.g. `class OKDTrainer(DistillTrainerMixin, SFTTrainer)`."""

    # TRL fields whose value is part of the method (the config's own fields are always listed on the card).
    _card_trl_fields: tuple[str, ...] = ()

    # ------------------------------------------------------------------ runs and checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        trainer_name = type(self).__name__
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"{trainer_name}: no complete checkpoint in output_dir {self.args.output_dir!r} to resume from."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            if not is_complete_checkpoint(resume_from_checkpoint):
                raise ValueError(
                    f"{trainer_name}: {os.fspath(resume_from_checkpoint)!r} is not a complete checkpoint (no readable "
                    f"{TRAINER_STATE_NAME}); the last complete one in output_dir is "
                    f"{last_complete_checkpoint(self.args.output_dir)!r}."
                )
        elif not resume_from_checkpoint:
            check_output_dir(
                self.args.output_dir,
                overwrite=getattr(self.args, "overwrite_output_dir", False),
                trainer_name=trainer_name,
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Trainer's single writer, pointed at a staging folder whose entries are then moved into `output_dir`."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save:  # non-writing ranks only join the collectives inside `_save`
            return super()._save(output_dir, state_dict=state_dict)
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
        try:
            super()._save(staging, state_dict=state_dict)
            self._save_extra(staging)
            move_into(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # The one pair of hooks `Trainer` calls in every set-up when it writes and reads a checkpoint's training state
    # (under DeepSpeed it skips `_load_from_checkpoint`, the engine loading the model itself).
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self._save_extra_state(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_extra_state(checkpoint)

    def _save_extra_state(self, output_dir: str) -> None:
        """Write the state a trainer keeps beside the model and the optimizer into checkpoint `output_dir`; read back
        by `_load_extra_state`. Every process calls it (a gather may be needed); only `args.should_save` writes.
        Here: TRL's running `num_tokens`. Subclasses extend it (OKD: the teacher adapter's optimizer and scheduler;
        ADPO: a full-model moving anchor) and call `super()`."""
        if self.args.should_save and hasattr(self, "_total_train_tokens"):
            write_text_atomically(
                os.path.join(output_dir, NUM_TOKENS_NAME), json.dumps({"num_tokens": self._total_train_tokens})
            )

    def _load_extra_state(self, checkpoint: str) -> None:
        """Restore what `_save_extra_state` (and `_save_extra`, for files beside the model) wrote into `checkpoint`
        when resuming, with or without DeepSpeed. Subclasses extend it and call `super()`."""
        path = os.path.join(checkpoint, NUM_TOKENS_NAME)
        if os.path.isfile(path) and hasattr(self, "_total_train_tokens"):
            with open(path, encoding="utf-8") as f:
                self._total_train_tokens = int(json.load(f)["num_tokens"])

    def _save_extra(self, output_dir: str) -> None:
        """Files a trainer saves next to the model, by `save_model` and in every checkpoint (OKD: `teacher_adapter/`);
        written into the staging folder. A checkpoint's copy is read back by `_load_extra_state`."""

    # ------------------------------------------------------------------ non-finite losses
    def _watch_terms(self, terms: dict[str, torch.Tensor | None]) -> None:
        """Name the tensors a loss is built from, in computation order: inspected only if the loss is non-finite."""
        watched = self.__dict__.setdefault("_watched_terms", {})
        watched.update({name: tensor for name, tensor in terms.items() if tensor is not None})

    def _check_finite(self, loss: torch.Tensor, model: torch.nn.Module, name: str = "loss") -> torch.Tensor:
        """Return `loss` if finite (or not training); else raise or, with `on_nonfinite="skip"`, a zero loss.

        The error names the first watched term that is non-finite, else `name` (what the loss is)."""
        watched, self._watched_terms = self.__dict__.get("_watched_terms", {}), {}
        skipping = getattr(self.args, "on_nonfinite", "raise") == "skip"
        if not self.model.training:
            return loss
        finite = bool(torch.isfinite(loss.detach()).all())
        if skipping:
            self._metrics["train"]["nonfinite_skipped"].append(0.0 if finite else 1.0)
        if finite:
            return loss
        term = next((name for name, t in watched.items() if not torch.isfinite(t.detach().float()).all()), name)
        where = (
            f"{type(self).__name__}: non-finite {term} at step {self.state.global_step + 1} "
            f"(epoch {self.state.epoch or 0:.2f}, loss={loss.detach().float().item()})"
        )
        if not skipping:
            raise FloatingPointError(
                f"{where}. Set `on_nonfinite='skip'` to skip such batches; a lower learning rate, fp32/bf16 instead of "
                "fp16, or checking the batch's data usually removes the cause."
            )
        logger.warning(f"{where}: batch skipped (zero gradients).")
        # A zero that reaches every trainable parameter, so DDP's gradient hooks all fire and no rank waits.
        params = [p for p in model.parameters() if p.requires_grad] + self._extra_trainable_parameters()
        return sum(p.reshape(-1)[:1].sum() for p in params) * 0.0 if params else loss.detach() * 0.0

    def _get_grad_norm(self, model, grad_norm=None):
        """`Trainer`'s gradient norm (pre-clip), then a check that every gradient about to be stepped is finite.

        A finite loss can still give NaN/inf gradients (an overflow inside the backward pass). `Trainer` would step
        on them and turn every weight into NaN; here they raise or, with `on_nonfinite="skip"`, the optimizer step
        is dropped (gradients set to None, so no optimizer moves a parameter). Under fp16 the GradScaler already
        skips such steps and lowers its scale, so it is left to do that."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.accelerator.scaler is not None:
            return grad_norm
        skipping = getattr(self.args, "on_nonfinite", "raise") == "skip"
        student_finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        extra_finite = True
        extra = self._extra_trainable_parameters()
        if extra:  # the same list on every process, so all of them reduce or none
            # extra parameters (OKD's teacher adapter) are not DDP-wrapped: agree across processes before acting
            grads = [p.grad for p in extra if p.grad is not None]
            extra_bad = torch.tensor(float(any(not torch.isfinite(g).all() for g in grads)),
                                     device=self.accelerator.device)
            extra_finite = self.accelerator.reduce(extra_bad, reduction="sum").item() == 0
        finite = student_finite and extra_finite
        if skipping:
            self._metrics["train"]["nonfinite_grad_skipped"].append(0.0 if finite else 1.0)
        if finite:
            return grad_norm
        named = list(model.named_parameters()) + self._extra_named_parameters()
        bad = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        where = (
            f"{type(self).__name__}: non-finite gradient at step {self.state.global_step + 1} with a finite loss, in "
            f"{shown or 'the parameters of another process'}"
        )
        if not skipping:
            raise FloatingPointError(
                f"{where}. Set `on_nonfinite='skip'` to skip such optimizer steps; a lower learning rate or a smaller "
                "`max_grad_norm` usually removes the cause."
            )
        logger.warning(f"{where}: optimizer step skipped.")
        for _, p in named:
            p.grad = None
        return grad_norm

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

    def _extra_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters outside `model` (OKD's teacher adapter), with the names errors show; skipped batches
        and skipped optimizer steps cover them too."""
        return []

    def _extra_trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._extra_named_parameters()]

    # ------------------------------------------------------------------ model card
    def _card_teacher(self) -> Any:
        """The teacher the card names (a model or a name), or None for methods that learn from data alone."""
        return getattr(self, "teacher_model", None)

    def _card_hyperparameters(self) -> list[tuple[str, Any]]:
        args = self.args
        world_size = max(getattr(args, "world_size", 1), 1)
        rows = [
            ("learning_rate", args.learning_rate),
            ("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            ("optimizer steps", self.state.global_step),
            ("epochs", self.state.epoch),
            (
                "effective batch size",
                args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
            ),
            ("max_length", getattr(args, "max_length", None)),
            ("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"),
            ("seed", args.seed),
        ]
        rows += [(name, getattr(args, name)) for name in self._card_trl_fields if hasattr(args, name)]
        # The fields trl-distill adds, not the hundred inherited TrainingArguments.
        rows += [
            (f.name, getattr(args, f.name))
            for f in added_fields(type(args))
            if f.name not in ("overwrite_output_dir", "on_nonfinite", "teacher_model_init_kwargs")
        ]
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict) and "default" in peft_config:
            config = peft_config["default"]
            for name in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules"):
                if hasattr(config, name):
                    value = getattr(config, name)
                    rows.append((f"student peft {name}", getattr(value, "value", value)))
        return rows

    def _card_results(self) -> list[tuple[str, Any]]:
        history = self.state.log_history
        rows: list[tuple[str, Any]] = []
        summary = next((entry for entry in reversed(history) if "train_loss" in entry), None)
        if summary is not None:
            rows += [(name, summary[name]) for name in ("train_loss", "train_runtime") if name in summary]
        last_train = next((entry for entry in reversed(history) if "loss" in entry), None)
        last_eval = next((entry for entry in reversed(history) if any(k.startswith("eval_") for k in entry)), None)
        for entry, prefix in ((last_train, "last logged "), (last_eval, "")):
            if entry is None:
                continue
            rows += [
                (f"{prefix}{name}" if prefix and not name.startswith("eval_") else name, value)
                for name, value in entry.items()
                if isinstance(value, (int, float)) and name not in ("step", "epoch", "learning_rate")
            ]
        return rows

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ):
        """Write `README.md` in `output_dir`: method, teacher, student base, hyperparameters, results, citations.

        Replaces TRL's card (same signature, called by `save_model` checkpoints and `push_to_hub`)."""
        if not self.is_world_process_zero():
            return
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        tags.add("distillation")
        unwrapped = self.accelerator.unwrap_model(self.model)
        is_peft = hasattr(unwrapped, "peft_config")
        student = getattr(unwrapped.config, "_name_or_path", None) or None
        if is_peft:
            student = getattr(unwrapped.peft_config.get("default"), "base_model_name_or_path", None) or student
        teacher = self._card_teacher()
        teacher_label = None if teacher is None else describe_model(teacher)
        quantization = getattr(self.args, "teacher_quantization", None)
        paper = self._paper or {}
        title = model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        hub_id = getattr(self, "hub_model_id", None) or title

        card_data = ModelCardData(
            base_model=_hub_id(student),
            datasets=dataset_name,
            library_name="peft" if is_peft else "transformers",
            model_name=title,
            tags=sorted(tags),
        )
        method = f"**{self._name}** (`{type(self).__name__}`)"
        if paper:
            method += f", from [{paper['title']}](https://huggingface.co/papers/{paper['id']})"
        setup = [
            ("method", method),
            ("student base model", student or "an in-memory model"),
            ("teacher", "none (learns from the dataset's traces)" if teacher is None else teacher_label),
            ("teacher quantization", quantization),
            ("dataset", dataset_name),
        ]
        citations = [paper["citation"]] if paper.get("citation") else []
        citations.append(TRL_CITATION)
        body = "\n\n".join(
            [
                f"# Model Card for {title}",
                f"This model was distilled with {method}, using trl-distill, a distillation library built on "
                "[TRL](https://github.com/huggingface/trl).",
                "## Quick start",
                "```python\nfrom transformers import pipeline\n\n"
                f'generator = pipeline("text-generation", model="{hub_id}")\n'
                'print(generator([{"role": "user", "content": "Hello!"}], max_new_tokens=64)[0]["generated_text"])\n```',
                "## Distillation set-up",
                _table([row for row in setup if row[1] is not None], ("", "")),
                "## Hyperparameters",
                _table(self._card_hyperparameters(), ("field", "value")),
                "## Training results",
                _table(self._card_results(), ("metric", "value"))
                if self.state.log_history
                else "No training step has been logged yet.",
                "## Framework versions",
                _table(_versions(is_peft), ("package", "version")),
                "## Citations",
                *[f"```bibtex\n{citation}\n```" for citation in citations],
            ]
        )
        card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")
        write_text_atomically(os.path.join(self.args.output_dir, "README.md"), str(card))
        return card
