"""Preference distillation (DistillDPOTrainer) on the shipped addition task, offline, on CPU.

    python examples/distill_dpo.py                          # mode dckd
    python examples/distill_dpo.py --mode adpa              # ADPA on the student's own greedy answers
    python examples/distill_dpo.py --mode teacher_ref       # DPO with the teacher as reference (LLaVA-MoD)
    python examples/distill_dpo.py --mode adpa --teacher_4bit   # the teacher's base in bitsandbytes nf4

1. trains (or reloads from cache) a 4-layer, 128-wide teacher on two-digit addition with reversed answers;
2. aligns it with TRL's DPO through a LoRA adapter on preference pairs (correct vs wrong answers) and saves the
   adapter: adapter on = the aligned teacher, adapter off = its reference (ADPA's two teachers from one base);
3. gives a fresh 2-layer, 48-wide student a short SFT start, then trains it with `DistillDPOTrainer`;
4. prints the student's exact match before and after.

A TRL DPO script becomes DistillDPO by swapping `DPOTrainer`/`DPOConfig` for `DistillDPOTrainer`/`DistillDPOConfig`
and passing `teacher_model=` instead of `ref_model=`. The CPU overrides (fp32, no gradient checkpointing, a large
learning rate for a tiny model) are for this demo; the library's defaults are TRL's, meant for GPUs.
"""

import argparse
import copy
import time

from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from trl_distill.addition import exact_match, make_splits, preference_dataset
from trl_distill.testing import pretrained_teacher, tiny_student, train_sft
from trl_distill.trainers.distill_dpo import MODES, DistillDPOConfig, DistillDPOTrainer

CPU = dict(bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="dckd", choices=MODES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--student_sft_steps", type=int, default=300)
    parser.add_argument("--teacher_dpo_steps", type=int, default=100)
    parser.add_argument("--teacher_4bit", action="store_true", help="load the teacher's base in nf4")
    parser.add_argument("--output_dir", default="outputs/distill-dpo-example")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    teacher, tokenizer = pretrained_teacher(seed=args.seed)
    train_problems, eval_problems = make_splits(seed=args.seed)
    pairs = preference_dataset(train_problems, seed=args.seed)
    # The trainer loads the teacher itself (4-bit and the adapter on request), so save the base and the adapter.
    teacher_path, adapter_path = f"{args.output_dir}/teacher-base", f"{args.output_dir}/teacher-aligned-adapter"
    teacher.save_pretrained(teacher_path)
    tokenizer.save_pretrained(teacher_path)
    aligner = DPOTrainer(
        model=copy.deepcopy(teacher),
        args=DPOConfig(output_dir=f"{args.output_dir}/teacher-dpo", max_steps=args.teacher_dpo_steps,
                       per_device_train_batch_size=32, learning_rate=5e-4, logging_steps=50, **CPU),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    aligner.train()
    aligner.model.save_pretrained(adapter_path)

    student = tiny_student(tokenizer, seed=args.seed)
    train_sft(student, tokenizer, train_problems, steps=args.student_sft_steps, seed=args.seed)
    print(f"student after SFT: exact match {exact_match(student, tokenizer, eval_problems):.1%}")

    config = DistillDPOConfig(
        output_dir=args.output_dir,
        mode=args.mode,  # the mode picks the authors' weights: dckd 1.0 CE + 0.1/0.1 KL, adpa 1.0 CE + 1.6 advantage
        teacher_adapter=adapter_path,
        teacher_quantization="4bit" if args.teacher_4bit else None,
        adpa_max_new_tokens=5,  # answers are at most 3 digits and <|end|>
        beta=0.1,
        max_steps=args.steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_steps=50,
        **CPU,
    )
    trainer = DistillDPOTrainer(
        model=student, teacher_model=teacher_path, args=config, train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()
    print(f"student after DistillDPO ({args.mode}): exact match {exact_match(student, tokenizer, eval_problems):.1%}")
    trainer.save_model(args.output_dir)
    print(f"saved to {args.output_dir} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
