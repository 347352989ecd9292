"""On-policy distillation side by side: `GKDVariant` (lmbda=1) vs TRL's `DistillationTrainer` and `GKDTrainer`.

    python benchmarks/onpolicy_vs_trl.py                     # CPU, V=32000, 2 rounds, about 5 minutes on 2 cores
    python benchmarks/onpolicy_vs_trl.py --rounds 1 --steps 3 --size tiny   # smoke run

The three trainers get the same student and teacher (random Qwen2-shaped models built once by
benchmarks/gpu_check.py: student 2 x 128, teacher 2 x 256, a 32,000-word tokenizer), the same prompts (batch 4 of
32 words), the same completion length (64 new tokens, sampled at temperature 1 with no top-k/top-p) and the same
loss (generalized JSD with beta 0.5: `loss_type="jsd"` in GKDVariant, TRL's `generalized_jsd_loss` in GKDTrainer and
`DistillationTrainer`). Every step the student samples its completions (GKD's `lmbda=1`; DistillationTrainer is
always on-policy), so sampling is part of every measured step.

Each trainer runs in a fresh process (gpu_check's rows `gkd_on`, `trl_gkd`, `trl_distillation`), `--rounds` times,
the trainers alternating within a round so that a change in machine load hits all of them alike. Reported:

* tokens/s: non-padding tokens (prompt + sampled completion) of the batches the loss is computed on, over the wall
  time of the steps after the first; the fastest round (least disturbed);
* peak memory: the process's resident-set high-water mark over its RSS before the models are loaded (CPU), or
  `torch.cuda.max_memory_allocated` (CUDA); the lowest round;
* each trainer's ratio to GKDVariant's.

Writes ``<output-dir>/onpolicy_vs_trl.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_check  # noqa: E402

ROWS = ("gkd_on", "trl_distillation", "trl_gkd")
NAMES = {"gkd_on": "GKDVariant (lmbda=1, chunked jsd)", "trl_distillation": "TRL DistillationTrainer (jsd)",
         "trl_gkd": "TRL GKDTrainer (lmbda=1, jsd)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="compare", choices=list(gpu_check.SIZES))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: two contended threads on a shared 2-core machine are slower)")
    parser.add_argument("--row-timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", default="outputs/onpolicy_vs_trl/models")
    parser.add_argument("--output-dir", default="outputs/onpolicy_vs_trl")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    cli = parse_args(argv)
    check_argv = ["--device", cli.device, "--size", cli.size, "--steps", str(cli.steps), "--threads",
                  str(cli.threads), "--work-dir", cli.work_dir, "--output-dir", cli.output_dir]
    check = gpu_check.parse_args(check_argv)
    gpu_check.build_assets(check)
    runs = {row: [] for row in ROWS}
    for round_index in range(cli.rounds):
        for row in ROWS:
            result = gpu_check.run_isolated(row, check, check_argv, timeout=cli.row_timeout)
            runs[row].append(result)
            print(f"[onpolicy_vs_trl] round {round_index + 1} {row}: {result['status']}, "
                  f"{gpu_check.fmt(result['tokens_per_s'])} tokens/s, {gpu_check.fmt(result['peak_mib'])} MiB, "
                  f"first loss {gpu_check.fmt(result['first_loss'], 5)}", flush=True)
            if result["status"] != "ok":
                print("    " + result.get("error", "").strip()[-500:], flush=True)

    summary = {}
    for row, results in runs.items():
        ok = [r for r in results if r["status"] == "ok"]
        summary[row] = {
            "tokens_per_s": max((r["tokens_per_s"] for r in ok), default=float("nan")),
            "peak_mib": min((r["peak_mib"] for r in ok), default=float("nan")),
            "first_loss": ok[0]["first_loss"] if ok else None,
            "rounds_ok": len(ok),
        }
    ours = summary["gkd_on"]
    lines = ["| trainer | tokens/s (best round) | vs GKDVariant | peak memory MiB (lowest round) | vs GKDVariant | "
             "first loss |", "|---|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        r = summary[row]
        speed = r["tokens_per_s"] / ours["tokens_per_s"] if ours["tokens_per_s"] else float("nan")
        memory = r["peak_mib"] / ours["peak_mib"] if ours["peak_mib"] else float("nan")
        r["tokens_per_s_vs_ours"], r["peak_vs_ours"] = speed, memory
        lines.append(f"| {NAMES[row]} | {gpu_check.fmt(r['tokens_per_s'])} | {gpu_check.fmt(speed, 2)}x | "
                     f"{gpu_check.fmt(r['peak_mib'])} | {gpu_check.fmt(memory, 2)}x | {gpu_check.fmt(r['first_loss'], 5)} |")
    table = "\n".join(lines)
    size = gpu_check.SIZES[cli.size]
    results = {"settings": {**vars(cli), **size, "shapes": gpu_check.SHAPES_OF[cli.size]}, "summary": summary,
               "runs": runs}
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onpolicy_vs_trl.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "onpolicy_vs_trl.md").write_text(table + "\n")
    print(table)
    failed = [row for row in ROWS if summary[row]["rounds_ok"] == 0 or not math.isfinite(summary[row]["tokens_per_s"])]
    if failed:
        print(f"[onpolicy_vs_trl] no successful run for: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
