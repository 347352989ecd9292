"""The model card every trl-distill trainer writes (`ModelCardMixin`, part of `DistillTrainerMixin`): TRL's card
(`trl.trainer.utils.generate_model_card`: its template, tags, wandb / trackio / Comet links, framework versions and
citations) with trl-distill's sections in it (method, teacher, student base, hyperparameters: the fields trl-distill
adds, not the hundred inherited ones; results) and trl-distill's and PEFT's versions in its version list."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard

from ..teacher import model_name as describe_model
from .checkpoints import write_text_atomically


def added_fields(config: type) -> list:
    """The dataclass fields trl-distill declares (on the config and its `DistillArguments`), not TRL's."""
    names = {
        name
        for base in config.__mro__
        if base.__module__.startswith("trl_distill")
        for name in vars(base).get("__annotations__", {})
    }
    return [f for f in fields(config) if f.name in names]



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


def _tracker_urls() -> dict[str, str | None]:
    """The runs TRL's card links to: wandb, trackio and Comet, as `BaseTrainer.create_model_card` finds them."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    wandb_url = None
    if is_wandb_available():
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    return {"wandb_url": wandb_url, "trackio_url": get_trackio_space_url(), "comet_url": get_comet_experiment_url()}


def _tags(trainer, tags: str | list[str] | None, extra: tuple[str, ...]) -> list[str]:
    """TRL's tag rules (unsloth, hf_jobs, a `trackio:<url>` tag) plus the trainer's tags and `extra`."""
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    if hasattr(trainer.model.config, "unsloth_version"):
        tags.add("unsloth")
    if "JOB_ID" in os.environ:
        tags.add("hf_jobs")
    tags.update(trainer._tag_names)
    tags.update(extra)
    return sorted(tags)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_model_card(
    trainer,
    *,
    model_name: str,
    hub_model_id: str,
    base_model: str | None,
    dataset_name: str | None,
    tags: str | list[str] | None,
    library_name: str,
    sections: list[str],
    extra_tags: tuple[str, ...] = (),
) -> ModelCard:
    """TRL's card for `trainer` (its `_name`, `_paper`, tracker badges, framework versions, citations) with
    `sections` (markdown) before its citations, trl-distill's and PEFT's versions in its version list, and
    `library_name` / `extra_tags` in its metadata."""
    from trl.trainer.utils import generate_model_card, get_trackio_space_url

    from .. import __version__

    paper = trainer._paper or {}
    all_tags = _tags(trainer, tags, extra_tags)
    trackio_url = get_trackio_space_url()
    if trackio_url is not None:
        all_tags = [tag for tag in all_tags if not tag.startswith("trackio:")] + [f"trackio:{trackio_url}"]
    card = generate_model_card(
        base_model=base_model,
        model_name=model_name,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        tags=all_tags,
        trainer_name=trainer._name,
        trainer_citation=paper.get("citation"),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        **_tracker_urls(),
    )
    card.data.library_name = library_name
    text = str(card)
    if base_model is None:  # TRL's template would link to huggingface.co/None
        text = text.replace("a fine-tuned version of [None](https://huggingface.co/None)",
                            "a fine-tuned version of a local model")
    versions = [f"- trl-distill: {_package_version('trl-distill') or __version__}"]
    if library_name == "peft" and _package_version("peft"):
        versions.append(f"- PEFT: {_package_version('peft')}")
    marker = "- Tokenizers: "
    if marker in text:
        line_end = text.index("\n", text.index(marker))
        text = text[:line_end] + "\n" + "\n".join(versions) + text[line_end:]
    citations = text.find("## Citations")
    extra = "\n\n".join(sections) + "\n\n"
    text = text[:citations] + extra + text[citations:] if citations >= 0 else text + "\n" + extra
    return ModelCard(text)


class ModelCardMixin:
    """`create_model_card` and what it reads; see the module docstring."""

    # TRL fields whose value is part of the method (the config's own fields are always listed on the card).
    _card_trl_fields: tuple[str, ...] = ()

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
            and not (f.name.startswith("vllm_") and not getattr(args, "use_vllm", False))  # unused without vLLM
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
        """Write `README.md` in `output_dir`: TRL's card with method, teacher, student base, hyperparameters, results.

        Replaces TRL's card (same signature, called by `save_model` checkpoints and `push_to_hub`)."""
        if not self.is_world_process_zero():
            return
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
        # TRL's card (template, tags, wandb / trackio / Comet links, versions, citations) with our sections in it
        card = build_model_card(
            self,
            model_name=title,
            hub_model_id=getattr(self, "hub_model_id", None) or title,
            base_model=_hub_id(student),
            dataset_name=dataset_name,
            tags=tags,
            library_name="peft" if is_peft else "transformers",
            extra_tags=("distillation",),
            sections=[
                "## Distillation set-up",
                f"Distilled with {method}, using trl-distill, a distillation library built on "
                "[TRL](https://github.com/huggingface/trl).",
                _table([row for row in setup if row[1] is not None], ("", "")),
                "## Hyperparameters",
                _table(self._card_hyperparameters(), ("field", "value")),
                "## Training results",
                _table(self._card_results(), ("metric", "value"))
                if self.state.log_history
                else "No training step has been logged yet.",
            ],
        )
        write_text_atomically(os.path.join(self.args.output_dir, "README.md"), str(card))
        return card
