"""Output folders and checkpoints of every trl-distill trainer (`CheckpointMixin`, part of `DistillTrainerMixin`).

- A fresh `train()` refuses an `output_dir` that already holds a saved model or checkpoints, and
  `resume_from_checkpoint=True` picks the last *complete* checkpoint (a killed save leaves an incomplete one).
- `_save` writes into a staging folder and moves each file into place with `os.replace`, so a crash mid-save leaves
  the previous file or the new one, never a truncated one.
- State a trainer keeps beside the model and the optimizer goes through one pair of hooks, `_save_extra_state` /
  `_load_extra_state`, which `Trainer` reaches in every set-up (DeepSpeed included).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

logger = logging.getLogger("trl_distill")

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



class CheckpointMixin:
    """Guarded output folders, atomic saves and the extra-state hooks; see the module docstring."""

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
