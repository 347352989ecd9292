"""Quickstart: distill a tiny teacher into a smaller student on the shipped addition task, offline, on CPU.

    bash scripts/quickstart.sh            # installs what it needs, then runs this file

1. trains (or reloads from cache) a 4-layer, 128-wide teacher on two-digit addition with reversed answers;
2. builds a fresh 2-layer, 48-wide student and measures its exact match;
3. distills the teacher into it with `GKDVariant` (forward KL, chunked loss) and measures again.

The CPU overrides below (fp32, no gradient checkpointing, a large learning rate for a tiny model) are for this
demo; the library's defaults are TRL's, meant for GPUs.
"""

import argparse
import time

from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import exact_match, make_splits, sft_dataset
from trl_distill.testing import pretrained_teacher, tiny_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="distillation steps")
    parser.add_argument("--teacher_steps", type=int, default=1500, help="SFT steps of the tiny teacher")
    parser.add_argument("--loss_type", default="forward_kl", help="any of trl_distill.losses.LOSS_TYPES")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a previous run's saved model")
    args = parser.parse_args()

    start = time.time()
    teacher, tokenizer = pretrained_teacher(steps=args.teacher_steps, seed=args.seed)
    train_problems, eval_problems = make_splits(seed=args.seed)
    student = tiny_student(tokenizer, seed=args.seed)
    teacher_em = exact_match(teacher, tokenizer, eval_problems)
    before = exact_match(student, tokenizer, eval_problems)
    print(f"teacher exact match {teacher_em:.1%}; student before distillation {before:.1%}")

    config = GKDVariantConfig(
        output_dir=args.output_dir,
        overwrite_output_dir=args.overwrite_output_dir,
        loss_type=args.loss_type,
        lmbda=0.0,  # off-policy: the dataset's completions (no generation, fastest on CPU)
        max_steps=args.steps,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=30,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = GKDVariant(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=sft_dataset(train_problems, format="messages"),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)

    after = exact_match(trainer.model, tokenizer, eval_problems)
    print(
        f"\nstudent exact match on {len(eval_problems)} held-out problems: "
        f"{before:.1%} -> {after:.1%} (teacher {teacher_em:.1%}), {time.time() - start:.0f} s in all"
    )


if __name__ == "__main__":
    main()
