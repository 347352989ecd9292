"""Online knowledge distillation (OKD) on the shipped addition task, offline, on CPU.

    python examples/okd.py                         # 600 steps, alpha 0.1, forward KL
    python examples/okd.py --teacher_4bit          # the teacher's frozen base in bitsandbytes nf4
    python examples/okd.py --teacher_update frozen # the plain frozen-teacher KD baseline

1. trains (or reloads from cache) a 4-layer, 128-wide teacher on two-digit addition with reversed answers;
2. builds a fresh 2-layer, 48-wide student;
3. trains the student with `OKDTrainer`: the teacher gets a LoRA online module that learns alongside the student
   (`alpha * KL(student || teacher) + (1 - alpha) * CE`), the student learns the forward KL from that teacher;
4. measures exact match of both and saves the student, with the teacher adapter in `teacher_adapter/`.

An SFT script becomes OKD by swapping `SFTTrainer`/`SFTConfig` for `OKDTrainer`/`OKDConfig` and passing
`teacher_model=`. The CPU overrides below (fp32, no gradient checkpointing, a large learning rate for a tiny model)
are for this demo; the library's defaults are TRL's, meant for GPUs.
"""

import argparse
import time

from trl_distill.addition import exact_match, make_splits, sft_dataset
from trl_distill.testing import pretrained_teacher, tiny_student
from trl_distill.trainers.okd import OKDConfig, OKDTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--alpha", type=float, default=0.1, help="weight of the KD term in the teacher loss")
    parser.add_argument("--loss_type", default="forward_kl", help="student loss: any of trl_distill.losses.LOSS_TYPES")
    parser.add_argument("--teacher_update", default="online", choices=["online", "frozen"])
    parser.add_argument("--teacher_4bit", action="store_true", help="load the teacher's base in nf4")
    parser.add_argument("--output_dir", default="outputs/okd-example")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    teacher, tokenizer = pretrained_teacher(seed=args.seed)
    train_problems, eval_problems = make_splits(seed=args.seed)
    print(f"teacher exact match {exact_match(teacher, tokenizer, eval_problems):.1%}")
    # The trainer loads the teacher itself (4-bit on request), so hand it a saved copy.
    teacher_path = f"{args.output_dir}/teacher-base"
    teacher.save_pretrained(teacher_path)
    tokenizer.save_pretrained(teacher_path)

    config = OKDConfig(
        output_dir=args.output_dir,
        teacher_update=args.teacher_update,
        teacher_quantization="4bit" if args.teacher_4bit else None,
        alpha=args.alpha,
        loss_type=args.loss_type,
        teacher_learning_rate=2e-3,  # the online module's own learning rate
        max_steps=args.steps,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=30,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        # CPU overrides of TRL's GPU defaults
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = OKDTrainer(
        model=tiny_student(tokenizer, seed=args.seed),
        teacher_model=teacher_path,
        args=config,
        # prompt-completion: the losses cover the answer only (a "messages" dataset would also train on the prompt)
        train_dataset=sft_dataset(train_problems, format="prompt_completion"),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)

    student_em = exact_match(trainer.model, tokenizer, eval_problems)
    teacher_em = exact_match(trainer.teacher_model, tokenizer, eval_problems)
    print(
        f"\nafter {args.steps} steps: student exact match {student_em:.1%}, teacher (with its online module) "
        f"{teacher_em:.1%}; {time.time() - start:.0f} s in all. Saved to {args.output_dir}."
    )


if __name__ == "__main__":
    main()
