"""Why do some divergences not learn from a fresh student? Trains the quickstart set-up with each divergence, ours and
TRL's side by side, and looks at where the student is wrong.

Set-up: `examples/quickstart.py` (the shipped addition task, the cached 4x128 teacher, a fresh 2x48 student,
off-policy ``lmbda=0``, batch 64, lr 3e-3 with a cosine schedule and 30 warm-up steps, clipping at 1, fp32, one
thread). Each run is a spec ``trainer:loss[:warm=N][:steps=N]``:

- ``trainer`` is ``ours`` (`GKDVariant`) or ``trl`` (TRL's `GKDTrainer`; ``forward_kl`` is ``beta=0`` and
  ``reverse_kl`` is ``beta=1`` of its generalized JSD);
- ``warm=N`` first trains the fresh student N steps with forward KL (constant lr 3e-3), then runs the spec's loss
  from there;
- ``steps=N`` replaces ``--steps``.

Printed per run: held-out exact match (500 problems, greedy), the last logged loss and gradient norm, and on one
training batch (teacher forcing) the fraction of completion positions whose argmax is wrong, the student's top
probability there and its probability of the right token there. A student that is *confidently wrong* (top
probability near 1, right token near 0) gets almost no gradient from reverse KL or TVD: their gradients with respect
to the logits are weighted by the student's own probabilities (``q * (...)``), unlike forward KL's ``q - p``.

    python benchmarks/gkd_divergences.py                         # the default runs, about 6 minutes on one core
    python benchmarks/gkd_divergences.py --runs ours:reverse_kl:steps=2400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import offline_env

offline_env()

DEFAULT_RUNS = [
    "ours:forward_kl", "trl:forward_kl", "ours:reverse_kl", "trl:reverse_kl", "ours:tvd", "ours:akl",
    "ours:reverse_kl:warm=300", "ours:tvd:warm=300",
]
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # the two TRL generalized-JSD settings that are a plain KL


def parse_spec(spec: str, default_steps: int) -> dict:
    trainer, loss_type, *options = spec.split(":")
    run = {"spec": spec, "trainer": trainer, "loss_type": loss_type, "warm": 0, "steps": default_steps}
    if trainer not in ("ours", "trl"):
        raise ValueError(f"run {spec!r}: the trainer must be 'ours' or 'trl', got {trainer!r}")
    from trl_distill.losses import LOSS_TYPES

    if trainer == "trl" and loss_type not in TRL_BETA:
        raise ValueError(f"run {spec!r}: TRL's GKDTrainer runs {sorted(TRL_BETA)} here, not {loss_type!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"run {spec!r}: unknown loss {loss_type!r}; choose from {list(LOSS_TYPES)}")
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("warm", "steps") or not value.isdigit():
            raise ValueError(f"run {spec!r}: options are warm=N and steps=N, got {option!r}")
        run[key] = int(value)
    return run


def training_config(config_class, output_dir: str, steps: int, seed: int, **overrides):
    from _common import trainer_args

    fields = trainer_args(output_dir, steps, batch_size=64, learning_rate=3e-3, seed=seed, lmbda=0.0,
                          lr_scheduler_type="cosine", warmup_steps=30, max_grad_norm=1.0,
                          logging_steps=min(50, steps))
    fields.update(overrides)
    return config_class(**fields)


def wrong_positions(model, teacher, batch) -> dict:
    """Teacher-forced statistics of the student on the completion positions of one collated batch."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    probs = logits.float().softmax(-1)[mask]
    target = labels[mask]
    wrong = probs.argmax(-1) != target
    right_prob = probs.gather(1, target[:, None])[:, 0]
    stats = {"positions": int(mask.sum()), "wrong_fraction": float(wrong.float().mean())}
    if wrong.any():
        stats["top_prob_where_wrong"] = float(probs.max(-1).values[wrong].mean())
        stats["right_prob_where_wrong"] = float(right_prob[wrong].median())
    return stats


def run_one(run: dict, seed: int, output_root: Path) -> dict:
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_distill import GKDVariant, GKDVariantConfig
    from trl_distill.addition import exact_match, make_splits, sft_dataset
    from trl_distill.testing import pretrained_teacher, tiny_student

    teacher, tokenizer = pretrained_teacher(seed=seed)
    train_problems, eval_problems = make_splits(seed=seed)
    dataset = sft_dataset(train_problems, format="messages")
    student = tiny_student(tokenizer, seed=seed)
    name = run["spec"].replace(":", "_").replace("=", "")
    start = time.time()
    warm_exact_match = None
    if run["warm"]:
        config = training_config(GKDVariantConfig, str(output_root / f"{name}_warm"), run["warm"], seed,
                                 loss_type="forward_kl", lr_scheduler_type="constant", warmup_steps=0)
        warm = GKDVariant(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
        warm.train()
        student = warm.model
        warm_exact_match = exact_match(student, tokenizer, eval_problems)
    if run["trainer"] == "trl":
        config = training_config(GKDConfig, str(output_root / name), run["steps"], seed,
                                 beta=TRL_BETA[run["loss_type"]])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    else:
        config = training_config(GKDVariantConfig, str(output_root / name), run["steps"], seed,
                                 loss_type=run["loss_type"])
        trainer = GKDVariant(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    batch = next(iter(trainer.get_train_dataloader()))
    return {
        **run,
        "exact_match": exact_match(trainer.model, tokenizer, eval_problems),
        "warm_exact_match": warm_exact_match,
        "last_loss": logs[-1]["loss"] if logs else float("nan"),
        "last_grad_norm": logs[-1]["grad_norm"] if logs else float("nan"),
        "losses": [(entry["step"], entry["loss"]) for entry in logs],
        "grad_norms": [(entry["step"], entry["grad_norm"]) for entry in logs],
        **wrong_positions(trainer.model, teacher, batch),
        "seconds": time.time() - start,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | steps | exact match | last loss | last grad norm | wrong positions | top prob there | "
        "right-token prob there (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = f"{r['warm']} (exact match {r['warm_exact_match']:.1%}) + {r['steps']}" if r["warm"] else str(r["steps"])
        top = f"{r['top_prob_where_wrong']:.3f}" if "top_prob_where_wrong" in r else "-"
        right = f"{r['right_prob_where_wrong']:.2g}" if "right_prob_where_wrong" in r else "-"
        lines.append(f"| `{r['spec']}` | {steps} | {r['exact_match']:.1%} | {r['last_loss']:.3f} | "
                     f"{r['last_grad_norm']:.3g} | {r['wrong_fraction']:.1%} | {top} | {right} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="trainer:loss[:warm=N][:steps=N] specs")
    parser.add_argument("--steps", type=int, default=600, help="training steps of a run without steps=N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default="outputs/gkd_divergences")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    runs = [parse_spec(spec, args.steps) for spec in args.runs]  # every spec checked before anything trains
    import torch

    torch.set_num_threads(args.threads)
    output_root = Path(args.output_dir)
    output_root.mkdir(parents=True, exist_ok=True)
    results = []
    for run in runs:
        results.append(run_one(run, args.seed, output_root))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("losses", "grad_norms")}), flush=True)
    (output_root / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
