"""REDI, both stages, on the shipped addition task, offline on CPU (https://huggingface.co/papers/2505.24850).

    trl-distill addition-assets --output_dir outputs/addition     # tiny teacher + untrained student
    python examples/redi.py                                        # stage 1 (SFT) then stage 2 (REDI)

Stage 1 is supervised fine-tuning on the *positive* traces only, with TRL's `SFTTrainer`. Stage 2 starts from the
stage-1 model and trains on (positive, negative) pairs with REDI's reference-free loss
`-l(y_w)/|y_w| + alpha * l(y_l)/|y_l|`.

The authors' settings (the GPU recipe, e.g. for a 1.5B student on teacher reasoning traces):
    stage 1: learning_rate 5e-5;
    stage 2: alpha 0.8, AdamW, learning_rate 1e-6, weight_decay 1e-4, warmup_steps 0.1 (10%) then linear decay,
             effective batch size 32, one epoch.
Here the models have ~60k parameters, so the CPU overrides below use far larger learning rates and a few hundred
steps; everything else (alpha, weight decay, warmup, linear decay) is the authors'.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from trl_distill import addition
from trl_distill.testing import tiny_student
from trl_distill.trainers.redi import REDIConfig, REDITrainer

CPU = dict(bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="outputs/addition/student", help="path of the untrained student")
    parser.add_argument("--output_dir", default="outputs/redi-addition")
    parser.add_argument("--sft_steps", type=int, default=600)
    parser.add_argument("--sft_learning_rate", type=float, default=3e-3)  # authors: 5e-5 (GPU, 1.5B)
    parser.add_argument("--redi_steps", type=int, default=300)
    parser.add_argument("--redi_learning_rate", type=float, default=5e-4)  # authors: 1e-6 (GPU, 1.5B)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if Path(args.student, "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(args.student)
        tokenizer = AutoTokenizer.from_pretrained(args.student)
    else:  # no assets written yet: build the same tiny student in memory
        tokenizer = addition.make_tokenizer()
        model = tiny_student(tokenizer, seed=args.seed)
    train_problems, eval_problems = addition.make_splits(seed=args.seed)
    pairs = addition.preference_dataset(train_problems, seed=args.seed)

    # Stage 1: SFT on the positive traces (the `chosen` completions), conversational prompt/completion format.
    positives = pairs.rename_column("chosen", "completion").remove_columns("rejected")
    sft = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=f"{args.output_dir}/stage1",
            max_steps=args.sft_steps,
            per_device_train_batch_size=64,
            learning_rate=args.sft_learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=30,
            logging_steps=max(1, args.sft_steps // 10),
            seed=args.seed,
            **CPU,
        ),
        train_dataset=positives,
        processing_class=tokenizer,
    )
    sft.train()
    stage1_em = addition.exact_match(sft.model, tokenizer, eval_problems)
    print(f"stage 1 (SFT on positives): exact match {stage1_em:.1%}")

    # Stage 2: REDI on (positive, negative) pairs, from the stage-1 weights; no reference model.
    redi = REDITrainer(
        model=sft.model,
        args=REDIConfig(
            output_dir=f"{args.output_dir}/stage2",
            alpha=args.alpha,
            max_steps=args.redi_steps,
            per_device_train_batch_size=32,
            learning_rate=args.redi_learning_rate,
            weight_decay=1e-4,
            warmup_steps=0.1,  # a float < 1 is a fraction of the steps (10% warmup)
            lr_scheduler_type="linear",
            logging_steps=max(1, args.redi_steps // 10),
            seed=args.seed,
            **CPU,
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    redi.train()
    print(f"stage 2 (REDI, alpha={args.alpha}): exact match {addition.exact_match(redi.model, tokenizer, eval_problems):.1%}")
    redi.save_model(f"{args.output_dir}/stage2")


if __name__ == "__main__":
    main()
