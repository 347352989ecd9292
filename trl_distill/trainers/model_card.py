"""The model card every trl-distill trainer writes (`ModelCardMixin`, part of `DistillTrainerMixin`): method, teacher,
student base, hyperparameters (the fields trl-distill adds, not the hundred inherited ones), results, framework
versions and citations."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData

from ..teacher import model_name as describe_model
from .checkpoints import write_text_atomically

TRL_CITATION = """\
@software{vonwerra2020trl,
    title   = {{TRL: Transformers Reinforcement Learning}},
    author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
    license = {Apache-2.0},
    url     = {https://github.com/huggingface/trl},
    year    = {2020}
}"""



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
