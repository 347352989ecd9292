"""GKD's exposure-bias argument, on mistakes that can be repaired: does on-policy training teach a student to go on
well after a mistake? A diagnostic of `quality.py`'s trained students (prediction 11 of docs/benchmarks.md).

    python benchmarks/exposure_bias.py --output-dir outputs/quality_small --learning-rate 3e-3 \
        --methods sft gkd_forward_kl_l0 gkd_forward_kl_l0.5 gkd_forward_kl_l1
    python benchmarks/exposure_bias.py --output-dir outputs/quality_small_from_sft --learning-rate 3e-4 \
        --methods gkd_forward_kl_l0 gkd_forward_kl_l1 --start-dir outputs/quality_small --start-lr 3e-3

On the task of `trl_distill.hmm_task` a completion is lost at its first impossible word, so validity cannot count a
recovery. Here each word is judged by p* with every earlier mistake skipped (`hmm_task.mistakes`: the limit of a
channel that swaps a word for noise with vanishing probability), so a mistake counts once and the words after it are
judged on their own. Per student (each run's saved ``runs/<run>/final``), on ``--n`` held-out prompts:

* its own completions at temperature 1: the share of words that are mistakes, the rate of first mistakes (positions
  with a clean prefix) and the mistake rate after its own first mistake;
* after an injected mistake: the first ``--position`` words of a held-out sample of p*, then a word p* cannot emit,
  then the student writes the rest at temperature 1; the mistake rate of what it writes (the same prefixes for every
  student, so they compare on equal terms);

and the same for the teacher (what on-policy GKD distills after a mistake) and, with ``--start-dir``, for the seeds'
SFT students the runs continued from. Paired over seeds: every ``gkd_<loss>_l1`` (and ``_l0.5``) against its
``gkd_<loss>_l0``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402

METRICS = ("mistake_rate", "first_mistake_rate", "after_mistake_rate", "injected_after_mistake_rate")


def measure(model, config, prompts, completions, position: int, seed: int) -> dict:
    """The four rates of one model (own samples seeded by ``seed``; the injection drawn from its own seeded stream)."""
    import torch

    from trl_distill import hmm_task

    own = hmm_task.sample_completions(model, config, prompts, torch.Generator().manual_seed(60_000 + seed))
    rates = hmm_task.mistake_rates(hmm_task.mistakes(config, prompts, own))
    injected = hmm_task.injected_mistake_rates(model, config, prompts, completions, position,
                                               torch.Generator().manual_seed(70_000 + seed))
    return {**rates, "injected_after_mistake_rate": injected["mistake_rate"]}


def summary(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/quality_small", help="the quality.py output dir of the runs")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--learning-rate", type=float, required=True, help="the runs' learning rate (their folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--start-dir", default=None, help="also measure the sft students in this output dir")
    parser.add_argument("--start-lr", type=float, default=3e-3, help="the learning rate of those sft runs")
    parser.add_argument("--n", type=int, default=500, help="held-out prompts (and samples of p* to inject into)")
    parser.add_argument("--position", type=int, default=8, help="words of p* kept before the injected mistake")
    parser.add_argument("--size", default="small", choices=list(quality.SIZES))
    cli = parser.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM

    from trl_distill import hmm_task

    torch.set_num_threads(1)
    cfg, config = quality.SIZES[cli.size], quality.task()
    # Their own stream (seed 5 of the eval split): not the prompts the students' validity was measured on.
    prompts, completions = hmm_task.sample_pairs(config, cli.n, "eval", seed=5)

    def final(output_dir: str, method: str, seed: int, lr: float) -> Path:
        path = quality.run_dir(output_dir, method, seed, lr) / "final"
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no saved student of {method} seed {seed} lr {lr:g} in {output_dir} ({path}): "
                                    "run it with quality.py (which saves every run's student)")
        return path

    students = [(f"sft start (lr {cli.start_lr:g})", cli.start_dir, "sft", cli.start_lr)] if cli.start_dir else []
    students += [(method, cli.output_dir, method, cli.learning_rate) for method in cli.methods]
    paths = {(name, seed): final(d, m, seed, lr) for name, d, m, lr in students for seed in cli.seeds}  # fail early
    rows = {}
    teacher, _ = quality.load_teacher(cfg)
    rows["teacher"] = [{"seed": seed, **measure(teacher, config, prompts, completions, cli.position, seed)}
                       for seed in cli.seeds]
    for name, *_ in students:
        rows[name] = []
        for seed in cli.seeds:
            model = LlamaForCausalLM.from_pretrained(paths[name, seed])
            rows[name].append({"seed": seed, **measure(model, config, prompts, completions, cli.position, seed)})
        print(f"{name}: " + ", ".join(f"{m} {summary([r[m] for r in rows[name]])[0]:.4f}" for m in METRICS),
              flush=True)

    table = {name: {m: summary([r[m] for r in runs]) for m in METRICS} for name, runs in rows.items()}
    pairs = {}
    for name in rows:
        if name.startswith("gkd_") and not name.endswith("_l0"):
            base = name.rpartition("_l")[0] + "_l0"
            if base in rows:
                diffs = {m: [a[m] - b[m] for a, b in zip(rows[name], rows[base])] for m in METRICS}
                pairs[f"{name} - {base}"] = {m: {"mean_std": summary(d), "lower_in": sum(x < 0 for x in d),
                                                 "seeds": len(d)} for m, d in diffs.items()}
    lines = [f"Mistakes per word ({cli.n} held-out prompts, temperature 1, {len(cli.seeds)} seeds; injected after "
             f"{cli.position} words of p*), mean ± std over seeds:", "",
             "| student | mistakes / word | first-mistake rate | after own first mistake | after injected mistake |",
             "|---|---|---|---|---|"]
    for name, stats in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{stats[m][0]:.2%} ± {stats[m][1]:.2%}" for m in METRICS) + " |")
    if pairs:
        lines += ["", "Paired over seeds (more on-policy minus off-policy; lower is fewer mistakes):", "",
                  "| pair | mistakes / word | first-mistake rate | after own first mistake | after injected mistake |",
                  "|---|---|---|---|---|"]
        for name, stats in pairs.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{stats[m]['mean_std'][0] * 100:+.2f} ± {stats[m]['mean_std'][1] * 100:.2f} pts (lower in "
                f"{stats[m]['lower_in']}/{stats[m]['seeds']})" for m in METRICS) + " |")
    text = "\n".join(lines)
    print(text)
    results = {"config": vars(cli), "runs": rows, "table": table, "pairs": pairs}
    out = Path(cli.output_dir)
    (out / "exposure_bias.json").write_text(json.dumps(results, indent=1))
    (out / "exposure_bias.md").write_text(text + "\n")
    print(f"wrote {out / 'exposure_bias.json'} and {out / 'exposure_bias.md'}")
    return results


if __name__ == "__main__":
    main()
