"""One tiny, CPU-fast instance of each of the five trainers, for tests that check behaviour every trainer shares."""

from __future__ import annotations

from trl_distill import (
    ADPOConfig,
    ADPOTrainer,
    DistillDPOConfig,
    DistillDPOTrainer,
    GKDVariant,
    GKDVariantConfig,
    OKDConfig,
    OKDTrainer,
    REDIConfig,
    REDITrainer,
    addition,
)

from .conftest import cpu_args

TRAINERS = ("gkd", "okd", "distill-dpo", "adpo", "redi")


def build(name: str, output_dir, *, tokenizer, student, teacher, problems, **overrides):
    """`name` in TRAINERS; `overrides` go to the config (on top of `cpu_args`)."""
    settings = {**cpu_args(), **overrides}
    common = dict(model=student, processing_class=tokenizer)
    if name == "gkd":
        args = GKDVariantConfig(output_dir=str(output_dir), lmbda=0.0, **settings)
        return GKDVariant(
            teacher_model=teacher, args=args, train_dataset=addition.sft_dataset(problems, format="messages"), **common
        )
    if name == "okd":
        args = OKDConfig(output_dir=str(output_dir), teacher_lora_r=4, **settings)
        dataset = addition.sft_dataset(problems, format="prompt_completion")
        return OKDTrainer(teacher_model=teacher, args=args, train_dataset=dataset, **common)
    if name == "distill-dpo":
        args = DistillDPOConfig(output_dir=str(output_dir), **settings)
        dataset = addition.preference_dataset(problems[:16])
        return DistillDPOTrainer(teacher_model=teacher, args=args, train_dataset=dataset, **common)
    if name == "adpo":
        args = ADPOConfig(output_dir=str(output_dir), anchor="teacher", **settings)
        dataset = addition.listwise_dataset(problems[:16], k=3)
        return ADPOTrainer(teacher_model=teacher, args=args, train_dataset=dataset, **common)
    if name == "redi":
        args = REDIConfig(output_dir=str(output_dir), **settings)
        return REDITrainer(args=args, train_dataset=addition.preference_dataset(problems[:16]), **common)
    raise ValueError(f"unknown trainer {name!r}, expected one of {TRAINERS}")
