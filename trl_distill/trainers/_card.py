"""Model cards built on TRL's: `trl.trainer.utils.generate_model_card` (TRL's template, tags, tracker links) with
trl-distill's sections (distillation set-up, hyperparameters, results) and versions added."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCard


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
    from trl.trainer.utils import get_trackio_space_url, generate_model_card

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
    versions = [f"- trl-distill: {_package_version('trl-distill') or _own_version()}"]
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


def _own_version() -> str:
    from .. import __version__

    return __version__
