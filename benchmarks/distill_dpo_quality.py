"""DistillDPO's modes vs plain DPO on the shipped addition task, from the same SFT student, same steps.

Set-up (all offline, CPU):
- teacher: `pretrained_teacher()` (4x128, SFT on the task), then a LoRA adapter trained with TRL's DPO on the
  preference pairs: adapter on = the preference-aligned teacher, adapter off = its reference (the SFT teacher), as in
  the ADPA paper (arXiv 2502.17927). One base + one adapter serves every DistillDPO mode.
- student start: `tiny_student` (2x48) after `--student_sft_steps` of SFT; every method starts from a copy of it.
- methods, each `--steps` optimizer steps of batch `--batch_size` on the same preference pairs:
  `dpo` (TRL's DPOTrainer, the SFT student as its own reference), `teacher_ref`, `dckd`, `adpa_rejected`,
  `adpa_student` (DistillDPOTrainer with each mode's defaults).
- metrics on held-out problems: exact match of greedy decoding (`addition.exact_match`) and preference accuracy, the
  fraction of held-out pairs whose chosen (correct) answer has a higher student log-probability than the rejected
  one (the student's own likelihood, so methods with different references compare fairly).

    python benchmarks/distill_dpo_quality.py --steps 200 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_distill import addition  # noqa: E402
from trl_distill.testing import pretrained_teacher, tiny_student, train_sft  # noqa: E402
from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer  # noqa: E402

METHODS = ("dpo", "teacher_ref", "dckd", "adpa_rejected", "adpa_student")
# DistillDPO methods -> (mode, adpa_responses); `adpa_max_new_tokens=5` fits the longest answer and <|end|>.
MODE_OF_METHOD = {
    "teacher_ref": ("teacher_ref", "student"),
    "dckd": ("dckd", "student"),
    "adpa_rejected": ("adpa", "rejected"),
    "adpa_student": ("adpa", "student"),
}


def common_args(output_dir: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        seed=seed,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs) -> float:
    """Fraction of pairs where the model's log-probability of `chosen` exceeds that of `rejected`."""
    model.eval()
    wins = 0
    for row in pairs:
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        prompt_ids = prompt_ids["input_ids"]
        scores = []
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[key], return_dict=True)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(ids[1:])
            scores.append(logits.gather(-1, targets[:, None])[len(prompt_ids) - 1 :].sum().item())
        wins += scores[0] > scores[1]
    return wins / len(pairs)


def aligned_teacher(teacher, tokenizer, pairs, steps: int, seed: int, workdir: str):
    """The SFT teacher plus a LoRA adapter trained with TRL's DPO (its own base as reference)."""
    args = DPOConfig(**common_args(f"{workdir}/teacher_dpo", steps, 32, 5e-4, seed), beta=0.1)
    trainer = DPOTrainer(
        model=copy.deepcopy(teacher),
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    trainer.train()
    model = trainer.model
    model.eval()
    return model


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    teacher, tokenizer = pretrained_teacher(steps=1500, seed=0)
    train_problems, eval_problems = addition.make_splits(seed=0, n_train=args.n_train, n_eval=args.n_eval)
    train_pairs = addition.preference_dataset(train_problems, seed=0)
    eval_pairs = addition.preference_dataset(eval_problems, seed=0)
    rows = []
    for seed in args.seeds:
        start = time.time()
        aligned = aligned_teacher(teacher, tokenizer, train_pairs, args.teacher_dpo_steps, seed, args.workdir)
        with aligned.disable_adapter():
            reference_em = addition.exact_match(aligned, tokenizer, eval_problems)
        aligned_em = addition.exact_match(aligned, tokenizer, eval_problems)
        print(f"[seed {seed}] teacher EM: reference {reference_em:.3f}, aligned {aligned_em:.3f} "
              f"({time.time() - start:.0f} s)")
        rows.append({"seed": seed, "method": "teacher (ref, adapter off)", "exact_match": reference_em,
                     "preference_accuracy": None, "seconds": None})
        with aligned.disable_adapter():
            rows[-1]["preference_accuracy"] = preference_accuracy(aligned, tokenizer, eval_pairs)
        rows.append({"seed": seed, "method": "teacher (aligned, adapter on)", "exact_match": aligned_em,
                     "preference_accuracy": preference_accuracy(aligned, tokenizer, eval_pairs), "seconds": None})

        sft_student = tiny_student(tokenizer, seed=seed)
        train_sft(sft_student, tokenizer, train_problems, steps=args.student_sft_steps, seed=seed)
        rows.append({"seed": seed, "method": f"student SFT start ({args.student_sft_steps} steps)",
                     "exact_match": addition.exact_match(sft_student, tokenizer, eval_problems),
                     "preference_accuracy": preference_accuracy(sft_student, tokenizer, eval_pairs), "seconds": None})
        for method in args.methods:
            student = copy.deepcopy(sft_student)
            common = common_args(f"{args.workdir}/{method}", args.steps, args.batch_size, args.lr, seed)
            start = time.time()
            if method == "dpo":
                trainer = DPOTrainer(
                    model=student, ref_model=copy.deepcopy(sft_student), args=DPOConfig(**common, beta=args.beta),
                    train_dataset=train_pairs, processing_class=tokenizer,
                )
            else:
                mode, responses = MODE_OF_METHOD[method]
                config = DistillDPOConfig(**common, beta=args.beta, mode=mode, adpa_responses=responses,
                                          adpa_max_new_tokens=5)
                trainer = DistillDPOTrainer(
                    model=student, teacher_model=aligned, args=config, train_dataset=train_pairs,
                    processing_class=tokenizer,
                )
            trainer.train()
            seconds = time.time() - start
            row = {"seed": seed, "method": method,
                   "exact_match": addition.exact_match(student, tokenizer, eval_problems),
                   "preference_accuracy": preference_accuracy(student, tokenizer, eval_pairs),
                   "seconds": round(seconds, 1)}
            print(json.dumps(row))
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Optimizer steps of every method.")
    parser.add_argument("--batch_size", type=int, default=32, help="Preference pairs per step.")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--student_sft_steps", type=int, default=300, help="SFT steps of the common student start.")
    parser.add_argument("--teacher_dpo_steps", type=int, default=100, help="DPO steps of the teacher's LoRA adapter.")
    parser.add_argument("--n_train", type=int, default=4000)
    parser.add_argument("--n_eval", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="outputs/bench_distill_dpo")
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args()
    rows = run(args)
    print("\n| seed | method | exact match | preference accuracy | train seconds |\n|---|---|---|---|---|")
    for row in rows:
        pa = "" if row["preference_accuracy"] is None else f"{row['preference_accuracy']:.3f}"
        print(f"| {row['seed']} | {row['method']} | {row['exact_match']:.3f} | {pa} | {row['seconds'] or ''} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
