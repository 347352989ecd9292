"""Preference trainers on the shipped addition task: DPO vs ADPO (listwise, K=4) vs REDI, from the same SFT start.

    python benchmarks/preference_quality.py                       # the recorded run (docs/adpo.md), CPU
    python benchmarks/preference_quality.py --steps 100 --sft-steps 300 --eval-every 50   # quicker

Protocol (SPEC section 9 task):

1. SFT start: `tiny_student` (2 layers, 48 wide) trained with `trl_distill.testing.train_sft` for `--sft-steps` on the
   train split; every method starts from a copy of these weights (and DPO / fixed-anchor ADPO use a frozen copy as
   reference / anchor).
2. Same number of optimizer steps (`--steps`), prompts per step (`--batch-size`), learning rate, schedule and seed
   for every method, each with its own defaults otherwise:
   - `dpo`: TRL's `DPOTrainer`, sigmoid loss, `beta=0.1`, pairs from `addition.preference_dataset` (one plausible
     mistake per prompt as `rejected`);
   - `adpo`: `ADPOTrainer` on `addition.listwise_dataset` (K=4: the correct answer and 3 plausible mistakes, rewards
     from the exact-match checker), `tau=1.0`, `beta_r=0.5`, `scale_rewards="group"`, fixed anchor;
   - `redi`: `REDITrainer`, `alpha=0.8`, on the same pairs as DPO.
3. Exact match (greedy, strict: the answer then `<|end|>`) on the held-out split, every `--eval-every` steps.

Writes `<output-dir>/preference_quality.json` (numbers and curves) and `docs/preference_quality.png` (curves).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from _common import make_exact_match_callback  # noqa: E402  (benchmarks/ is on sys.path)
from trl_distill import addition  # noqa: E402
from trl_distill.testing import tiny_student, train_sft  # noqa: E402
from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer  # noqa: E402
from trl_distill.trainers.redi import REDIConfig, REDITrainer  # noqa: E402

METHODS = ("dpo", "adpo", "redi")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every preference method")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    parser.add_argument("--plot", default="docs/preference_quality.png")
    return parser.parse_args(argv)


def common_args(cli, output_dir):
    return dict(
        output_dir=output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(0.1 * cli.steps),  # the REDI authors' 10% warmup, for every method alike
        seed=cli.seed,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, cli.steps // 20),
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=32,
    )


def build(method, start, tokenizer, train_problems, cli, output_dir):
    args = common_args(cli, output_dir)
    policy, reference = copy.deepcopy(start), copy.deepcopy(start)
    pairs = addition.preference_dataset(train_problems, seed=cli.seed)
    if method == "dpo":
        return DPOTrainer(policy, ref_model=reference, args=DPOConfig(beta=0.1, **args), train_dataset=pairs,
                          processing_class=tokenizer)
    if method == "adpo":
        lists = addition.listwise_dataset(train_problems, k=4, seed=cli.seed)
        return ADPOTrainer(policy, ref_model=reference, args=ADPOConfig(**args), train_dataset=lists,
                           processing_class=tokenizer)
    if method == "redi":
        return REDITrainer(policy, args=REDIConfig(alpha=0.8, **args), train_dataset=pairs, processing_class=tokenizer)
    raise ValueError(method)


def main(argv=None):
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    torch.manual_seed(cli.seed)
    tokenizer = addition.make_tokenizer()
    train_problems, eval_problems = addition.make_splits(seed=cli.seed, n_train=cli.n_train, n_eval=cli.n_eval)

    start = tiny_student(tokenizer, seed=cli.seed)
    t0 = time.time()
    train_sft(start, tokenizer, train_problems, steps=cli.sft_steps, seed=cli.seed)
    sft_em = addition.exact_match(start, tokenizer, eval_problems)
    print(f"SFT start: {cli.sft_steps} steps, exact match {sft_em:.3f} ({time.time() - t0:.0f} s)")

    results = {"config": vars(cli), "sft_exact_match": sft_em, "methods": {}}
    for method in cli.methods:
        t0 = time.time()
        trainer = build(method, start, tokenizer, train_problems, cli, str(Path(cli.output_dir) / method))
        curve = make_exact_match_callback(tokenizer, eval_problems, cli.eval_every)
        curve.points.append((0, sft_em))
        trainer.add_callback(curve)
        trainer.train()
        seconds = time.time() - t0
        final = curve.points[-1][1]
        losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
        results["methods"][method] = {"exact_match": final, "curve": curve.points, "loss": losses, "seconds": seconds}
        print(f"{method}: exact match {final:.3f} after {cli.steps} steps ({seconds:.0f} s)")

    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preference_quality.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'preference_quality.json'}")
    print("| method | exact match | train time (s) |\n|---|---|---|")
    print(f"| SFT start | {sft_em:.3f} | |")
    for method, r in results["methods"].items():
        print(f"| {method} | {r['exact_match']:.3f} | {r['seconds']:.0f} |")

    if cli.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_em, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
        for method, r in results["methods"].items():
            steps, em = zip(*r["curve"])
            ax_em.plot(steps, em, marker="o", label=method)
            if r["loss"]:
                ls, lv = zip(*r["loss"])
                ax_loss.plot(ls, lv, label=method)
        ax_em.set(xlabel="optimizer step", ylabel="held-out exact match", title="Addition task, same SFT start")
        ax_loss.set(xlabel="optimizer step", ylabel="training loss (each method's own)", title="Training loss")
        ax_em.legend()
        ax_loss.legend()
        fig.tight_layout()
        Path(cli.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(cli.plot, dpi=110)
        print(f"wrote {cli.plot}")
    return results


if __name__ == "__main__":
    main()
