"""OKD vs SFT-only vs frozen-teacher KD on the shipped addition task: same student, data, steps and optimizer.

    python benchmarks/okd_quality.py                       # 600 steps each, batch 64, alpha 0.1
    python benchmarks/okd_quality.py --alphas 0.1 0.3 0.5  # one OKD run per alpha, and a table by alpha

(Both rewrite the plot at ``--plot``, docs/okd_curves.png by default; pass ``--plot ''`` to leave it alone.)

The teacher is `pretrained_teacher()` (4 layers, 128 wide, SFT on the task; cached on disk), the student a fresh
`tiny_student` (2 layers, 48 wide) built from the same seed for every run. Data: the task's 4,000 training problems
in prompt-completion form, so every run learns (and distills) the answer tokens only. Runs:

* ``sft``: TRL's `SFTTrainer` on the ground-truth completions;
* ``kd``: `OKDTrainer(teacher_update="frozen")`, forward KL from the frozen teacher (plain off-policy KD);
* ``okd``: `OKDTrainer` (forward KL student loss; teacher LoRA online module r=32 trained with
  ``alpha * KL(q_student || p_teacher) + (1 - alpha) * CE``).

All use the same `SFTConfig`-level settings (AdamW, cosine schedule with warm-up, clipping at 1, fp32 on CPU). Exact
match (greedy, the answer then the end token) is measured on the task's 500 held-out problems every
``--eval-every`` steps; the teacher's own exact match is measured too (for OKD, with its trained online module).
Writes ``results.json`` in ``--output-dir``, the curves plot (``--plot``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import trainer_args  # noqa: E402  (sets the offline environment before transformers is imported)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_distill.addition import exact_match, make_splits, sft_dataset  # noqa: E402
from trl_distill.testing import pretrained_teacher, tiny_student  # noqa: E402
from trl_distill.trainers.okd import OKDConfig, OKDTrainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="student learning rate (all runs)")
    parser.add_argument("--teacher-learning-rate", type=float, default=2e-3, help="OKD teacher adapter learning rate")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1], help="one OKD run per alpha")
    parser.add_argument("--runs", nargs="+", default=["sft", "kd", "okd"], choices=["sft", "kd", "okd"])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs/okd_quality")
    parser.add_argument("--plot", default="docs/okd_curves.png", help="'' to skip the plot")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="train nothing: print the table and plot the curves of earlier runs' results.json files "
                             "(e.g. runs split over several processes with --runs)")
    return parser.parse_args(argv)


class ExactMatchCurve(TrainerCallback):
    """Exact match of the student (and the teacher, when given) every `every` optimizer steps."""

    def __init__(self, student, tokenizer, problems, every, teacher=None):
        self.student, self.tokenizer, self.problems = student, tokenizer, problems
        self.every, self.teacher = every, teacher
        self.points: list[dict] = []

    def measure(self, step):
        point = {"step": step, "student": exact_match(self.student, self.tokenizer, self.problems)}
        if self.teacher is not None:
            point["teacher"] = exact_match(self.teacher, self.tokenizer, self.problems)
        self.points.append(point)
        print(f"  step {step}: " + ", ".join(f"{k} {v:.1%}" for k, v in point.items() if k != "step"), flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(state.global_step)


def common_args(args, name):
    return trainer_args(
        str(Path(args.output_dir) / name), args.steps, args.batch_size, args.learning_rate, args.seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
        lr_scheduler_type="cosine", warmup_steps=30, weight_decay=0.01, max_grad_norm=1.0, logging_steps=50,
    )


def run(name, args, tokenizer, teacher_path, train, evaluation, alpha=None):
    """Train one fresh student; returns its curve, final metrics and seconds."""
    student = tiny_student(tokenizer, seed=args.seed)
    # prompt-completion: every run learns the completion tokens only (messages would also train on the prompt)
    dataset = sft_dataset(train, format="prompt_completion")
    if name == "sft":
        trainer = SFTTrainer(model=student, args=SFTConfig(**common_args(args, name)), train_dataset=dataset,
                             processing_class=tokenizer)
        teacher = None
    else:
        online = name.startswith("okd")
        config = OKDConfig(
            **common_args(args, name),
            teacher_update="online" if online else "frozen",
            alpha=alpha if alpha is not None else 0.1,
            teacher_learning_rate=args.teacher_learning_rate,
        )
        trainer = OKDTrainer(model=student, teacher_model=teacher_path, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
        teacher = trainer.teacher_model if online else None
    curve = ExactMatchCurve(trainer.model, tokenizer, evaluation, args.eval_every, teacher=teacher)
    trainer.add_callback(curve)
    print(f"[{name}] training {args.steps} steps", flush=True)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    if not curve.points or curve.points[-1]["step"] != args.steps:
        curve.measure(args.steps)
    result = {"name": name, "alpha": alpha, "seconds": seconds, "curve": curve.points, **curve.points[-1]}
    history = [e for e in trainer.state.log_history if "loss" in e]
    result["final_log"] = history[-1] if history else {}
    return result


def plot(results, teacher_exact, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for result in results:
        steps = [p["step"] for p in result["curve"]]
        ax.plot(steps, [100 * p["student"] for p in result["curve"]], marker="o", label=label_of(result))
    ax.axhline(100 * teacher_exact, color="gray", linestyle="--", label="teacher (before training)")
    ax.set_xlabel("optimizer step (batch 64)")
    ax.set_ylabel("student exact match on 500 held-out problems (%)")
    ax.set_title("2x48 student on reversed two-digit addition")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def label_of(result):
    if result["name"] == "sft":
        return "SFT only"
    if result["name"] == "kd":
        return "frozen-teacher KD (forward KL)"
    return f"OKD (alpha={result['alpha']})"


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        summaries = [json.loads(Path(path).read_text()) for path in args.merge]
        if len({summary["config"]["seed"] for summary in summaries}) > 1:
            seeds_report(summaries, args.plot)
            return
        results = [result for summary in summaries for result in summary["results"]]
        report(results, summaries[0]["teacher_exact_match"], args.plot)
        return
    torch.set_num_threads(args.threads)
    teacher, tokenizer = pretrained_teacher(seed=args.seed)
    train, evaluation = make_splits(seed=args.seed)
    teacher_exact = exact_match(teacher, tokenizer, evaluation)
    print(f"teacher exact match {teacher_exact:.1%}", flush=True)
    # The trainer loads the teacher itself (as a path): save the cached teacher where it can be found.
    teacher_path = Path(args.output_dir) / "teacher"
    teacher.save_pretrained(teacher_path)
    tokenizer.save_pretrained(teacher_path)

    results = []
    for name in args.runs:
        if name == "okd":
            for alpha in args.alphas:
                results.append(run(f"okd_alpha{alpha}", args, tokenizer, teacher_path, train, evaluation, alpha))
        else:
            results.append(run(name, args, tokenizer, teacher_path, train, evaluation))

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args), "teacher_exact_match": teacher_exact, "results": results,
               "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'}")

    report(results, teacher_exact, args.plot)


def report(results, teacher_exact, plot_path):
    """The markdown table (exact match at every measured step) and, unless `plot_path` is empty, the curves."""
    steps = sorted({p["step"] for r in results for p in r["curve"]})
    print("\n| run | " + " | ".join(f"step {s}" for s in steps) + " | teacher after | train time (s) |")
    print("|---" * (len(steps) + 3) + "|")
    for result in results:
        at = {p["step"]: p["student"] for p in result["curve"]}
        cells = " | ".join(f"{at[s]:.1%}" if s in at else "-" for s in steps)
        teacher_after = f"{result['teacher']:.1%}" if "teacher" in result else "-"
        print(f"| {label_of(result)} | {cells} | {teacher_after} | {result['seconds']:.0f} |")
    print(f"(teacher before training: {teacher_exact:.1%})")
    okd = [r for r in results if r["name"].startswith("okd")]
    if len(okd) > 1:
        alpha_table(okd)
    if plot_path:
        plot(results, teacher_exact, plot_path)


def seeds_report(summaries, plot_path):
    """Runs of several seeds (``--merge`` of their results.json): final exact match per seed and run, the mean, how
    often each run beat SFT and frozen KD, and (unless `plot_path` is empty) the mean curve of each run with the range
    over seeds."""
    labels = list(dict.fromkeys(label_of(r) for summary in summaries for r in summary["results"]))
    final = {}  # (seed, label) -> final exact match
    curves = {label: [] for label in labels}
    for summary in summaries:
        for result in summary["results"]:
            final[summary["config"]["seed"], label_of(result)] = result["student"]
            curves[label_of(result)].append({p["step"]: p["student"] for p in result["curve"]})
    seeds = sorted({seed for seed, _ in final})
    print("\n| seed | " + " | ".join(labels) + " | teacher |")
    print("|---" * (len(labels) + 2) + "|")
    teachers = {summary["config"]["seed"]: summary["teacher_exact_match"] for summary in summaries}
    for seed in seeds:
        cells = [f"{final[seed, label]:.1%}" if (seed, label) in final else "-" for label in labels]
        print(f"| {seed} | " + " | ".join(cells) + f" | {teachers[seed]:.1%} |")
    means = [[final[s, label] for s in seeds if (s, label) in final] for label in labels]
    print("| mean | " + " | ".join(f"{sum(v) / len(v):.1%}" for v in means) + " | |")
    print("| median | " + " | ".join(f"{statistics.median(v):.1%}" for v in means) + " | |")
    for label in labels:
        for baseline in ("SFT only", "frozen-teacher KD (forward KL)"):
            if label == baseline or not label.startswith("OKD") or baseline not in labels:
                continue
            pairs = [(final[s, label], final[s, baseline]) for s in seeds if (s, label) in final and (s, baseline) in final]
            wins = sum(a > b for a, b in pairs)
            gap = sum(a - b for a, b in pairs) / len(pairs)
            print(f"{label} vs {baseline}: higher in {wins} of {len(pairs)} seeds, mean difference {100 * gap:+.1f} points")
    if not plot_path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label in labels:
        steps = sorted(set.intersection(*(set(curve) for curve in curves[label])))
        values = [[100 * curve[s] for curve in curves[label]] for s in steps]
        line, = ax.plot(steps, [sum(v) / len(v) for v in values], marker="o", label=f"{label}, mean")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step (batch 64)")
    ax.set_ylabel("student exact match, 500 held-out problems (%)")
    ax.set_title(f"mean over seeds {', '.join(map(str, seeds))} (band: min to max)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=110)
    print(f"wrote {plot_path}")


def alpha_table(results):
    """One row per OKD run: alpha, the student's final and best exact match, the teacher after, final logged losses."""
    print("\n| alpha | student exact match (final) | best (step) | teacher exact match after "
          "| loss/teacher_kd | loss/teacher_ce | teacher_agreement | train time (s) |")
    print("|---" * 8 + "|")
    for result in sorted(results, key=lambda r: r["alpha"]):
        best = max(result["curve"], key=lambda p: p["student"])
        log = result.get("final_log", {})
        keys = ("loss/teacher_kd", "loss/teacher_ce", "teacher_agreement")
        cells = [f"{log[k]:.3f}" if k in log else "-" for k in keys]
        print(f"| {result['alpha']:g} | {result['student']:.1%} | {best['student']:.1%} ({best['step']}) "
              f"| {result['teacher']:.1%} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    print("(teacher losses and agreement: the last logged training values, an average over the last logging window)")


if __name__ == "__main__":
    main()
