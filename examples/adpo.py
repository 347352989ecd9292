"""ADPO on the shipped addition task, listwise (K=4), offline on CPU (https://huggingface.co/papers/2510.18913).

    trl-distill addition-assets --output_dir outputs/addition     # tiny teacher + untrained student
    python examples/adpo.py                                        # SFT start, then ADPO with a fixed anchor
    python examples/adpo.py --anchor teacher                       # the tiny teacher as the anchor (distillation)
    python examples/adpo.py --anchor ema --ema_decay 0.99

Each prompt comes with 4 completions (the correct answer and 3 plausible mistakes). Their rewards are not read from
the dataset: `reward_funcs=[addition.reward_exact_match]` scores them, in TRL's GRPO reward convention, so any
`trl.rewards` function or your own checker plugs in the same way. ADPO then fits `softmax((l_theta - l_anchor)/tau)`
over the 4 completions to `q = softmax(z / beta_r)`, z the rewards' z-score within the prompt.

The student first gets a short SFT (`trl_distill.testing.train_sft`), as preference methods start from an SFT model.
CPU overrides: fp32, a large learning rate for a ~60k-parameter model, a few hundred steps.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_distill import addition
from trl_distill.testing import tiny_student, train_sft
from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="outputs/addition/student")
    parser.add_argument("--teacher", default="outputs/addition/teacher", help="anchor for --anchor teacher")
    parser.add_argument("--anchor", default="fixed", choices=["fixed", "ema", "periodic", "teacher"])
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--beta_r", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--sft_steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--output_dir", default="outputs/adpo-addition")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if Path(args.student, "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(args.student)
        tokenizer = AutoTokenizer.from_pretrained(args.student)
    else:  # no assets written yet: build the same tiny student in memory
        tokenizer = addition.make_tokenizer()
        model = tiny_student(tokenizer, seed=args.seed)
    train_problems, eval_problems = addition.make_splits(seed=args.seed)
    train_sft(model, tokenizer, train_problems, steps=args.sft_steps, seed=args.seed)
    print(f"SFT start: exact match {addition.exact_match(model, tokenizer, eval_problems):.1%}")

    # Drop the dataset's own rewards: the reward function recomputes them (the two agree on this task).
    lists = addition.listwise_dataset(train_problems, k=args.k, seed=args.seed).remove_columns("rewards")
    config = ADPOConfig(
        output_dir=args.output_dir,
        anchor=args.anchor,
        ema_decay=args.ema_decay,
        tau=args.tau,
        beta_r=args.beta_r,
        max_steps=args.steps,
        per_device_train_batch_size=32,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        max_length=32,
        logging_steps=max(1, args.steps // 10),
        seed=args.seed,
        # CPU overrides (TRL's defaults target GPUs)
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ADPOTrainer(
        model=model,
        teacher_model=args.teacher if args.anchor == "teacher" else None,
        args=config,
        train_dataset=lists,
        processing_class=tokenizer,
        reward_funcs=[addition.reward_exact_match],
    )
    trainer.train()
    print(f"ADPO ({args.anchor} anchor): exact match {addition.exact_match(trainer.model, tokenizer, eval_problems):.1%}")
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
