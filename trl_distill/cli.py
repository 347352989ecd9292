"""`trl-distill` command line: one sub-command per trainer, parsed by TRL's `TrlParser`, with `trl`'s conventions.

    trl-distill gkd --config examples/gkd_addition.yaml
    trl-distill gkd --config recipe.yaml --num_processes 2 --accelerate_config zero2   # through `accelerate launch`
    trl-distill addition-assets --output_dir outputs/addition     # tiny offline models + data for the recipes
    trl-distill teacher-topk --teacher outputs/addition/teacher --dataset addition --top_k 64 --output_dir out/top64

Every field of the trainer's config (and TRL's `ScriptArguments` / `DatasetMixtureConfig` / `ModelConfig`) is a flag
and a YAML key; `trl-distill gkd --help` lists them with their help text. As with `trl`, flags and YAML keys that are
none of these go to `accelerate launch` (`--accelerate_config` names a file or one of TRL's shipped configs such as
`zero2`), which refuses any it does not know.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ScriptArguments

logger = logging.getLogger(__name__)

# The name under which recipes ask for the shipped task instead of a Hub dataset.
ADDITION_DATASET = "addition"


@dataclass
class DistillScriptArguments(ScriptArguments, DatasetMixtureConfig):
    """Script-level arguments of every sub-command: TRL's `ScriptArguments` (`dataset_name`, `dataset_config`, splits,
    `dataset_streaming`, ...) and `DatasetMixtureConfig` (`datasets:` mixtures with `data_files`, `streaming`,
    `test_split_size`), and the shipped addition task. The teacher's fields, `teacher_model_revision` included, are
    the config's (`TeacherArguments`), as in TRL's `DistillationConfig`."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub id or path of the dataset, or '{ADDITION_DATASET}' for the shipped addition task. "
                          "Ignored when a `datasets` mixture is given."},
    )
    addition_num_train: int = field(default=4000, metadata={"help": "Training problems of the addition task."})
    addition_num_eval: int = field(default=500, metadata={"help": "Evaluation problems of the addition task."})
    addition_seed: int = field(default=0, metadata={"help": "Seed of the addition task's fixed splits."})
    addition_listwise_k: int = field(
        default=4, metadata={"help": "Completions per prompt of the addition task's listwise data (ADPO); 0 = pairs."}
    )


def load_datasets(script_args: DistillScriptArguments, format: str):
    """Train and eval datasets: the shipped addition task (built offline) or `datasets.load_dataset`."""
    if script_args.dataset_name == ADDITION_DATASET:
        from . import addition

        train, evaluation = addition.make_splits(
            seed=script_args.addition_seed,
            n_train=script_args.addition_num_train,
            n_eval=script_args.addition_num_eval,
        )
        return addition.sft_dataset(train, format=format), addition.sft_dataset(evaluation, format=format)
    if script_args.datasets:
        from trl import get_dataset

        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.")
        dataset = get_dataset(script_args)
    elif script_args.dataset_name is not None:
        from datasets import load_dataset

        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError(
            f"A dataset is required: `dataset_name` (a Hub id, a path, or '{ADDITION_DATASET}') or a `datasets` mixture."
        )
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset_train_split={script_args.dataset_train_split!r} is not a split of the dataset "
            f"(splits: {sorted(dataset)})."
        )
    return dataset[script_args.dataset_train_split], dataset.get(script_args.dataset_test_split)


def load_preference_datasets(script_args: DistillScriptArguments, listwise_k: int = 0):
    """Train/eval preference data: the addition task's pairs (`listwise_k=0`) or K-completion lists, or a Hub dataset."""
    if script_args.dataset_name != ADDITION_DATASET:
        return load_datasets(script_args, format="messages")
    from . import addition

    train, evaluation = addition.make_splits(
        seed=script_args.addition_seed, n_train=script_args.addition_num_train, n_eval=script_args.addition_num_eval
    )
    if listwise_k:
        return tuple(addition.listwise_dataset(p, k=listwise_k, seed=script_args.addition_seed) for p in (train, evaluation))
    return tuple(addition.preference_dataset(p, seed=script_args.addition_seed) for p in (train, evaluation))


def _student_and_tokenizer(model_args, training_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    if model_args.model_name_or_path is None:
        raise ValueError("`model_name_or_path` (the student) is required.")
    init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    init_kwargs = {k: v for k, v in init_kwargs.items() if v is not None}
    # The config's own `model_init_kwargs` (e.g. `use_kernels`) win, as in TRL's scripts. The model is built here, so
    # they are consumed: the trainer would otherwise warn that they are ignored for an instantiated model.
    init_kwargs.update(getattr(training_args, "model_init_kwargs", None) or {})
    if getattr(training_args, "model_init_kwargs", None) is not None:
        training_args.model_init_kwargs = None
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _finish(trainer, training_args, script_args):
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # `--resume_from_checkpoint true`: the last complete checkpoint of output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def _require_teacher(training_args, command: str) -> str:
    if training_args.teacher_model_name_or_path is None:
        raise ValueError(f"`teacher_model_name_or_path` is required for `trl-distill {command}`.")
    return training_args.teacher_model_name_or_path


def teacher_init_kwargs(script_args, training_args, model_args) -> dict:
    """The teacher's `from_pretrained` arguments, as TRL's distillation script builds them: the student's
    `attn_implementation` and `dtype`, `trust_remote_code`, `teacher_model_revision`, then the config's
    `teacher_model_init_kwargs` on top (they win). A 4-bit teacher does not take the student's dtype: its unquantized
    layers keep the compute dtype (bf16 on CUDA) rather than ModelConfig's float32 default (a 7B teacher's
    embeddings and head alone would take some 4 GB in float32)."""
    four_bit = getattr(training_args, "teacher_quantization", None) == "4bit"
    kwargs = dict(
        revision=getattr(training_args, "teacher_model_revision", None),
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=None if four_bit else model_args.dtype,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(training_args.teacher_model_init_kwargs or {})
    return kwargs


def _train(trainer_class, datasets, script_args, training_args, model_args, **trainer_kwargs) -> None:
    """Load the student, build `trainer_class` on `datasets` (train, eval), train, save and optionally push."""
    from trl import get_peft_config

    if hasattr(training_args, "teacher_model_init_kwargs"):
        training_args.teacher_model_init_kwargs = teacher_init_kwargs(script_args, training_args, model_args)
    model, tokenizer = _student_and_tokenizer(model_args, training_args)
    train_dataset, eval_dataset = datasets
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    if script_args.ignore_bias_buffers:
        ignore_bool_buffers_in_ddp(trainer.model)
    _finish(trainer, training_args, script_args)


def ignore_bool_buffers_in_ddp(model) -> list[str]:
    """`ignore_bias_buffers`, as TRL's DPO script applies it: DDP leaves the model's boolean buffers (attention
    masks kept as buffers) out of its broadcast, which fails on them (transformers#22482)."""
    import torch

    from ._compat import ignore_in_ddp

    names = [name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool]
    ignore_in_ddp(model, names)
    return names


def run_gkd(script_args, training_args, model_args) -> None:
    from .trainers.gkd import GKDVariant

    from .offline_teacher import is_teacher_topk_dir, load_teacher_topk

    if is_teacher_topk_dir(script_args.dataset_name):  # stored teacher: no teacher model is loaded
        teacher, datasets = None, (load_teacher_topk(script_args.dataset_name), None)
    else:
        teacher = _require_teacher(training_args, "gkd")
        datasets = load_datasets(script_args, format="messages")  # TRL's GKD collator reads the "messages" column
    _train(GKDVariant, datasets, script_args, training_args, model_args, teacher_model=teacher)


def run_okd(script_args, training_args, model_args) -> None:
    from .trainers.okd import OKDTrainer

    teacher = _require_teacher(training_args, "okd")
    # prompt-completion: OKD's losses cover the answer only, as SFT's completion-only loss does
    datasets = load_datasets(script_args, format="prompt_completion")
    _train(OKDTrainer, datasets, script_args, training_args, model_args, teacher_model=teacher)


def run_distill_dpo(script_args, training_args, model_args) -> None:
    from .trainers.distill_dpo import DistillDPOTrainer

    from .offline_teacher import is_teacher_topk_dir, load_teacher_topk

    if is_teacher_topk_dir(script_args.dataset_name):  # stored teacher (mode=dckd): no teacher model is loaded
        teacher, datasets = None, (load_teacher_topk(script_args.dataset_name), None)
    else:
        teacher = _require_teacher(training_args, "distill-dpo")
        datasets = load_preference_datasets(script_args)
    _train(DistillDPOTrainer, datasets, script_args, training_args, model_args, teacher_model=teacher)


def run_adpo(script_args, training_args, model_args) -> None:
    from .trainers.adpo import ADPOTrainer

    # A teacher anchor comes from `teacher_model_name_or_path` in the config.
    datasets = load_preference_datasets(script_args, listwise_k=script_args.addition_listwise_k)
    _train(ADPOTrainer, datasets, script_args, training_args, model_args)


def run_redi(script_args, training_args, model_args) -> None:
    from .trainers.redi import REDITrainer

    _train(REDITrainer, load_preference_datasets(script_args), script_args, training_args, model_args)


def _gkd_config():
    from .trainers.gkd import GKDVariantConfig

    return GKDVariantConfig


def _okd_config():
    from .trainers.okd import OKDConfig

    return OKDConfig


def _distill_dpo_config():
    from .trainers.distill_dpo import DistillDPOConfig

    return DistillDPOConfig


def _adpo_config():
    from .trainers.adpo import ADPOConfig

    return ADPOConfig


def _redi_config():
    from .trainers.redi import REDIConfig

    return REDIConfig


# sub-command -> (help, config class factory, runner)
COMMANDS = {
    "gkd": ("Generalized KD with more divergences, top-k and chunked loss (GKDVariant).", _gkd_config, run_gkd),
    "okd": (
        "Online KD: a LoRA online module on the (4-bit) teacher learns alongside the student (OKDTrainer).",
        _okd_config,
        run_okd,
    ),
    "distill-dpo": (
        "DPO with a teacher reference, DCKD and ADPA preference distillation (DistillDPOTrainer).",
        _distill_dpo_config,
        run_distill_dpo,
    ),
    "adpo": ("Anchored listwise preference optimization (ADPOTrainer).", _adpo_config, run_adpo),
    "redi": ("Reference-free reinforcement distillation, stage 2 (REDITrainer).", _redi_config, run_redi),
}


def addition_assets(argv: list[str]) -> None:
    """Write a trained tiny teacher, an untrained tiny student and their tokenizer for the offline recipes."""
    parser = argparse.ArgumentParser(prog="trl-distill addition-assets", description=addition_assets.__doc__)
    parser.add_argument("--output_dir", default="outputs/addition", help="Where to write teacher/ and student/.")
    parser.add_argument("--teacher_steps", type=int, default=1500, help="SFT steps of the tiny teacher.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .testing import pretrained_teacher, tiny_student

    out = Path(args.output_dir)
    teacher, tokenizer = pretrained_teacher(steps=args.teacher_steps, seed=args.seed)
    for name, model in (("teacher", teacher), ("student", tiny_student(tokenizer, seed=args.seed))):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(f"wrote {out / name}")


def _teacher_topk(argv: list[str]) -> None:
    """Score a dataset with a teacher once and store its top-k log-probs (offline teacher)."""
    from .offline_teacher import main as teacher_topk_main

    teacher_topk_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands with their own argument parsing (no trainer config).
    standalone = {"addition-assets": addition_assets, "teacher-topk": _teacher_topk}
    names = sorted([*COMMANDS, *standalone])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(__doc__)
        print("sub-commands:")
        for name in names:
            print(f"  {name:16s} {COMMANDS[name][0] if name in COMMANDS else standalone[name].__doc__}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"trl-distill: unknown sub-command {argv[0]!r}; choose one of {names}.")
        return
    command, rest = argv[0], argv[1:]
    if command in standalone:
        standalone[command](rest)
        return
    from .launcher import launch_if_asked

    parser = make_parser(command)
    if launch_if_asked(parser, command, rest):
        return
    script_args, training_args, model_args = parser.parse_args_and_config(args=rest, fail_with_unknown_args=False)
    COMMANDS[command][2](script_args, training_args, model_args)


def make_parser(command: str):
    """TRL's `TrlParser` over (script arguments, `command`'s config class, TRL's `ModelConfig`): YAML and flags."""
    from trl import ModelConfig, TrlParser

    return TrlParser((DistillScriptArguments, COMMANDS[command][1](), ModelConfig), prog=f"trl-distill {command}")


if __name__ == "__main__":
    main()
