"""Train each of the five trainers for two optimizer steps on one fixed global batch and write what came out.

`tests/test_distributed.py` launches it twice, on 2 CPU processes and on 1, and compares the results:

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes N \
        --mixed_precision no --main_process_port PORT tests/distributed/train_all.py OUT_DIR GLOBAL_BATCH [NAME ...]

Every process writes, for every trainer NAME, `OUT_DIR/NAME.rank<r>.json` (launch facts, the logged losses and a
checksum of every trainable parameter) and `OUT_DIR/NAME.rank<r>.pt` (each trainable parameter after training and its
change over training: the student's and, for OKD, the teacher's online module).

The set-up makes N processes equal one process up to float rounding, so any larger difference is a bug:

- The dataset has exactly GLOBAL_BATCH rows and is read in order (`train_sampling_strategy="sequential"`): every
  optimizer step sees all rows, and with N processes process r gets rows [r*B/N, (r+1)*B/N) (accelerate gives
  consecutive per-device batches to consecutive processes).
- Plain SGD, no gradient clipping: a parameter's change is linear in its gradient, so a gradient scaled wrongly
  across processes shows up 1:1 (Adam's normalisation would all but hide a factor of N).
- No dropout and no sampling (GKD's `lmbda=0`; DistillDPO without student generations).
- Every trainer's data puts 3-digit answers on the first half of the rows and 2-digit ones on the second, so the
  processes hold *different* numbers of completion tokens: what `average_tokens_across_devices` must get right
  (GKD's and OKD's losses, DistillDPO's CE/KL terms and ADPO's anchor KL are divided by the global token count of the
  step; REDI, DPO and ADPO's listwise loss are means per sequence or prompt).
- Each process seeds torch differently before building its trainer, as a script with per-process randomness would:
  whatever DDP synchronises (the student) and what the trainers must synchronise themselves (OKD's freshly drawn
  teacher adapter) must not depend on it.

`okd_4bit` is OKD with `teacher_quantization="4bit"` on an in-memory teacher: every process makes its own nf4 copy.
`gkd_padded_head` is `gkd` with the teacher's head padded by 13 rows that carry ~0 mass (as real checkpoints pad):
the first-batch check of the mass beyond the student's vocabulary runs (on the whole head, gathered under ZeRO-3)
and passes. `gkd_foreign_head`'s teacher has 13 extra rows of real mass (tokens the student's tokenizer lacks): the
check must stop training on every process, before the first step; its result file holds the error (`refused`).
`adpo_ema` is ADPO with `anchor="ema"` and no PEFT: the anchor is a second, full model updated after every step.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # the test machine has 2 cores for 2 processes

from trl_distill import (  # noqa: E402
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
)
from trl_distill import addition  # noqa: E402
from trl_distill.testing import pad_output_head, tiny_causal_lm  # noqa: E402
from trl_distill.trainers._common import gathered_parameters  # noqa: E402

TRAINERS = ("gkd", "gkd_padded_head", "okd", "okd_4bit", "distill_dpo", "adpo", "adpo_ema", "redi")
REFUSED = ("gkd_foreign_head",)  # training must stop with an error, on every process (last: the run ends there)


def uneven_problems(n: int) -> list[tuple[int, int]]:
    """n problems: the first half with 3-digit sums, the second with 2-digit sums."""
    pool = addition.make_problems(200, seed=0)
    long, short = [p for p in pool if sum(p) >= 100], [p for p in pool if sum(p) < 100]
    return long[: n - n // 2] + short[: n // 2]


def common_args(name: str, out_dir: str, per_device: int) -> dict:
    return dict(
        output_dir=os.path.join(out_dir, name),
        use_cpu=True,  # with ACCELERATE_USE_CPU: the processes join one gloo group on a machine without GPU
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        max_steps=2,
        train_sampling_strategy="sequential",
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def build(name: str, out_dir: str, global_batch: int, per_device: int, **overrides):
    """Trainer `name` on its global batch; `overrides` replace `common_args` fields (tests/distributed/resume_all.py)."""
    tokenizer = addition.make_tokenizer()
    student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1)
    args = {**common_args(name, out_dir, per_device), **overrides}
    if name in ("gkd", "gkd_padded_head", "gkd_foreign_head"):
        if name == "gkd_padded_head":  # padding rows at logit -30: ~1e-13 of the mass each
            teacher = pad_output_head(teacher, len(tokenizer) + 13)
        if name == "gkd_foreign_head":  # a random head: the 13 extra rows get as much mass as any token
            teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1,
                                     padded_vocab=len(tokenizer) + 13)
        return GKDVariant(
            model=student,
            teacher_model=teacher,
            args=GKDVariantConfig(**args, lmbda=0.0, loss_type="forward_kl", loss_chunk_size=7),
            train_dataset=addition.sft_dataset(uneven_problems(global_batch)),
            processing_class=tokenizer,
        )
    if name in ("okd", "okd_4bit"):
        # okd_4bit: the paper's set-up, a trainable LoRA online module on an nf4 base (bitsandbytes' CPU kernels here),
        # one 4-bit copy of the teacher per process.
        return OKDTrainer(
            model=student,
            teacher_model=teacher,
            args=OKDConfig(
                **args, teacher_lora_r=4, teacher_lora_alpha=8, teacher_lora_dropout=0.0, alpha=0.3, loss_chunk_size=7,
                teacher_quantization="4bit" if name == "okd_4bit" else None,
            ),
            train_dataset=addition.sft_dataset(uneven_problems(global_batch)),
            processing_class=tokenizer,
        )
    if name == "distill_dpo":
        # DPO with the teacher as reference plus DCKD's CE and KL terms: every part of the loss runs.
        return DistillDPOTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillDPOConfig(**args, mode="dckd", dpo_weight=1.0, teacher_top_k=5),
            train_dataset=addition.preference_dataset(uneven_problems(global_batch)),
            processing_class=tokenizer,
        )
    if name == "adpo":
        return ADPOTrainer(
            model=student,
            teacher_model=teacher,
            args=ADPOConfig(**args, anchor="teacher", anchor_kl_coef=0.1),
            train_dataset=addition.listwise_dataset(uneven_problems(global_batch), k=3),
            processing_class=tokenizer,
        )
    if name == "adpo_ema":  # a full-model moving anchor: a second model that checkpoints must carry
        return ADPOTrainer(
            model=student,
            args=ADPOConfig(**args, anchor="ema", ema_decay=0.5, anchor_kl_coef=0.1),
            train_dataset=addition.listwise_dataset(uneven_problems(global_batch), k=3),
            processing_class=tokenizer,
        )
    if name == "redi":
        return REDITrainer(
            model=student,
            args=REDIConfig(**args),
            train_dataset=addition.preference_dataset(uneven_problems(global_batch)),
            processing_class=tokenizer,
        )
    raise ValueError(f"unknown trainer {name!r}; one of {TRAINERS + REFUSED}")


def trainable(trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter, by name: the student's, and the teacher's online module (OKD)."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    named = [(f"student.{n}", p) for n, p in student.named_parameters() if p.requires_grad]
    named += [(f"teacher.{n}", p) for n, p in getattr(trainer, "teacher_parameters", [])]
    with gathered_parameters([p for _, p in named]):  # ZeRO-3 keeps only each process's shard of a parameter
        return {n: p.detach().clone() for n, p in named}


def main() -> None:
    out_dir, global_batch = sys.argv[1], int(sys.argv[2])
    names = sys.argv[3:] or TRAINERS + REFUSED
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
    for name in names:
        torch.manual_seed(1000 + rank)  # per-process randomness before the trainer exists (see the docstring)
        trainer = build(name, out_dir, global_batch, global_batch // world_size)
        state = trainer.accelerator.state
        before = trainable(trainer)
        if name in REFUSED:
            try:
                trainer.train()
            except ValueError as error:
                with open(os.path.join(out_dir, f"{name}.rank{state.process_index}.json"), "w") as f:
                    json.dump({"refused": str(error), "global_step": trainer.state.global_step,
                               "process_index": state.process_index}, f)
                return  # the last name: a trainer stopped mid-`train()` is not reused
            raise AssertionError(f"{name}: training was not refused")
        trainer.train()
        after = trainable(trainer)
        teacher = getattr(trainer, "teacher_model", None) or getattr(trainer, "ref_model", None)
        facts = {
            "trainer": type(trainer).__name__,
            "num_processes": state.num_processes,
            "process_index": state.process_index,
            "distributed_type": str(state.distributed_type),
            "backend": state.backend,
            "student_wrapper": type(trainer.model_wrapped).__name__,
            "teacher_wrapper": None if teacher is None else type(teacher).__name__,
            "teacher_4bit": teacher is not None and any(type(p).__name__ == "Params4bit" for p in teacher.parameters()),
            "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
            "global_step": trainer.state.global_step,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "checksums": {n: [p.double().sum().item(), p.double().abs().sum().item()] for n, p in after.items()},
        }
        stem = os.path.join(out_dir, f"{name}.rank{state.process_index}")
        with open(stem + ".json", "w") as f:
            json.dump(facts, f, indent=1)
        torch.save({"final": after, "deltas": {n: after[n] - before[n] for n in after}}, stem + ".pt")
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
