"""One reproducible evaluation of every trainer on the shipped addition task: exact match, time, tokens/s, memory.

    python benchmarks/run_all.py                                   # default size "small": 11.5 min on 2 CPU cores
    python benchmarks/run_all.py --methods sft gkd_jsd okd redi    # a subset
    python benchmarks/run_all.py --size medium --device cuda       # bigger models, more steps (meant for a GPU)
    python benchmarks/run_all.py --size tiny --in-process          # smoke run (2 steps), what the test runs

Set-up (everything offline, fixed by ``--seed``):

* data: `addition.make_splits(seed)`, the train split for training, the held-out split for exact match (greedy,
  strict: the answer then ``<|end|>``, `addition.exact_match`);
* teacher: the cached `trl_distill.testing.pretrained_teacher` (4 layers x 128, SFT on the train split) at the
  default size; sizes with another teacher shape train one the same way (`train_sft`) and cache it under
  ``--output-dir``;
* student: a `tiny_causal_lm` built from ``seed`` (2 layers x 48 at the default size, = `tiny_student`).

Methods, each for the same number of optimizer steps (``--steps``) of the same number of prompts (``--batch-size``):

* from a fresh student (family "distill": AdamW, lr 3e-3, cosine with 5% warm-up, weight decay 0.01, clipping at
  1, as benchmarks/okd_quality.py): ``sft`` (TRL `SFTTrainer`, prompt-completion data), ``gkd_<loss>`` for every
  divergence in `trl_distill.losses.LOSS_TYPES` (`GKDVariant`, TRL's GKD defaults ``lmbda=0.5``, ``beta=0.5``,
  sampling temperature 0.9, ``max_new_tokens`` = longest answer + end), ``okd`` (`OKDTrainer`, online LoRA teacher
  module, ``alpha=0.1``, teacher lr 2e-3);
* from the same SFT-warmed student (family "preference", as benchmarks/preference_quality.py and
  benchmarks/distill_dpo_quality.py do): `train_sft` for ``--warmup-steps`` (default: as many steps as the
  others get) at lr 3e-3, then lr 5e-4, linear decay with 10% warm-up: ``distill_dpo`` (`DistillDPOTrainer`,
  ``mode="teacher_ref"``: DPO with the teacher as reference, beta 0.1), ``dpo`` (TRL `DPOTrainer`, sigmoid, beta
  0.1, the warm start's frozen copy as reference), ``adpo`` (`ADPOTrainer`, lists of K=4 from
  `addition.listwise_dataset`, fixed anchor = the warm start), ``redi`` (`REDITrainer`, alpha 0.8). Pairs: the
  correct answer vs one plausible mistake (`addition.preference_dataset`).

Every method runs in a fresh Python process (so one run's retained heap does not hide the next one's peak; use
``--in-process`` to skip that, e.g. in tests) and reports:

* exact match on the held-out split every ``--eval-every`` steps and at the end (the table shows the end);
* train time: wall time of `trainer.train()` minus the time spent in those evaluations;
* train tokens/s: non-padding tokens of the training micro-batches the student reads (counted in `compute_loss`,
  so GKD's on-policy batches count as generated; a preference row counts chosen + rejected, an ADPO row all K),
  over the train time;
* peak memory: CPU, the process's resident-set high-water mark (`benchmarks/_rss.py`) minus its RSS once the data
  is built, before the models are; CUDA, `torch.cuda.max_memory_allocated()` over the memory allocated at that
  point. Evaluations are left out (the mark is read before and reset after each).

Writes ``<output-dir>/run_all.json`` and ``run_all.md`` (the table), and into ``--plot-dir`` (default ``docs`` for
the recorded size ``small``, else ``--output-dir``)
``run_all_loss_curves.png`` (each method's own training loss) and ``run_all_metric_vs_steps.png`` (held-out exact
match along training).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helpers, also when imported

from _common import (  # noqa: E402
    PeakMemory,
    counting,
    launch_worker,
    make_exact_match_callback,
    mib,
    synchronize,
    trainer_args,
)

from trl_distill.losses import LOSS_TYPES  # noqa: E402

GKD_METHODS = tuple(f"gkd_{loss}" for loss in LOSS_TYPES)
DISTILL_METHODS = ("sft", *GKD_METHODS, "okd")
PREFERENCE_METHODS = ("distill_dpo", "dpo", "adpo", "redi")
METHODS = DISTILL_METHODS + PREFERENCE_METHODS
TEACHER_METHODS = (*GKD_METHODS, "okd", "distill_dpo")
LABELS = {
    "sft": "SFT only (TRL SFTTrainer)",
    **{f"gkd_{loss}": f"GKDVariant {loss}" for loss in LOSS_TYPES},
    "okd": "OKDTrainer (online, alpha 0.1)",
    "distill_dpo": "DistillDPOTrainer (teacher_ref)",
    "dpo": "DPO (TRL DPOTrainer)",
    "adpo": "ADPOTrainer (K=4)",
    "redi": "REDITrainer (alpha 0.8)",
}
COLUMNS = ("method", "start", "exact_match", "train_seconds", "tokens_per_s", "peak_mib")

# Model shapes are "layers x hidden". `steps` and `warmup_steps` of the preference warm start may be overridden.
SIZES = {
    # smoke test: seconds on a CPU, meaningless numbers
    "tiny": dict(student="1x16", teacher="1x32", teacher_steps=3, steps=2, batch_size=4, n_train=64, n_eval=16,
                 eval_every=1, digits=2),
    # the recorded CPU run (docs/benchmarks.md): the task's own student and cached teacher
    "small": dict(student="2x48", teacher="4x128", teacher_steps=1500, steps=600, batch_size=64, n_train=4000,
                  n_eval=500, eval_every=50, digits=2),
    # meant for a GPU: wider models, more steps
    "medium": dict(student="2x96", teacher="4x256", teacher_steps=3000, steps=2000, batch_size=128, n_train=4000,
                   n_eval=500, eval_every=100, digits=2),
    # meant for a GPU: three-digit addition, deeper models
    "large": dict(student="4x128", teacher="8x512", teacher_steps=6000, steps=5000, batch_size=256, n_train=50000,
                  n_eval=1000, eval_every=250, digits=3),
}
DISTILL_LR, PREFERENCE_LR = 3e-3, 5e-4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available (one GPU: the Trainer's default device)")
    parser.add_argument("--steps", type=int, default=None, help="override the size's optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=None, help="override the size's prompts per step")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="train_sft steps of the preference methods' warm start (default: --steps)")
    parser.add_argument("--eval-every", type=int, default=None, help="override the size's evaluation interval")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"learning rate of the methods from a fresh student and of the warm start "
                             f"(default {DISTILL_LR})")
    parser.add_argument("--preference-learning-rate", type=float, default=None,
                        help=f"learning rate of the preference methods (default {PREFERENCE_LR})")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="override the size's teacher training steps (a teacher is cached per step count)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output-dir", default="outputs/run_all")
    parser.add_argument("--plot-dir", default=None,
                        help="where the two PNGs go (default: docs/ for --size small, else --output-dir); '' for none")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (faster start; CPU peaks are then less clean)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_of(cli) -> dict:
    cfg = dict(SIZES[cli.size])
    for key in ("steps", "batch_size", "eval_every", "teacher_steps"):
        if getattr(cli, key) is not None:
            cfg[key] = getattr(cli, key)
    cfg["learning_rate"] = cli.learning_rate or DISTILL_LR
    cfg["preference_learning_rate"] = cli.preference_learning_rate or PREFERENCE_LR
    cfg["warmup_steps"] = cli.warmup_steps if cli.warmup_steps is not None else cfg["steps"]
    cfg["eval_every"] = min(cfg["eval_every"], cfg["steps"])
    return cfg


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_model(tokenizer, spec: str, seed: int):
    from trl_distill.testing import tiny_causal_lm

    layers, hidden = (int(x) for x in spec.split("x"))
    return tiny_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed)


def teacher_path(cli, cfg) -> Path:
    """Where the teacher is cached: `pretrained_teacher`'s own cache for the task's teacher, else the output dir."""
    from trl_distill.testing import teacher_cache_path

    if cfg["teacher"] == "4x128" and cfg["digits"] == 2:
        return teacher_cache_path(steps=cfg["teacher_steps"], seed=cli.seed)
    name = f"teacher_{cfg['teacher']}_d{cfg['digits']}_s{cli.seed}_{cfg['teacher_steps']}"
    return Path(cli.output_dir) / "cache" / name


def ensure_teacher(cli, cfg, device: str):
    """The teacher (trained and cached on first use) and the task's tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from trl_distill import addition
    from trl_distill.testing import pretrained_teacher, train_sft

    if cfg["teacher"] == "4x128" and cfg["digits"] == 2:
        teacher, tokenizer = pretrained_teacher(steps=cfg["teacher_steps"], seed=cli.seed)
        return teacher.to(device), tokenizer
    path = teacher_path(cli, cfg)
    tokenizer = addition.make_tokenizer()
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval(), tokenizer
    train, _ = addition.make_splits(seed=cli.seed, n_train=cfg["n_train"], n_eval=cfg["n_eval"], digits=cfg["digits"])
    teacher = build_model(tokenizer, cfg["teacher"], seed=cli.seed).to(device)
    print(f"training a {cfg['teacher']} teacher for {cfg['teacher_steps']} steps (cached at {path})", flush=True)
    train_sft(teacher, tokenizer, train, steps=cfg["teacher_steps"], seed=cli.seed)
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return teacher.eval(), tokenizer


def warm_start_path(cli) -> Path:
    return Path(cli.output_dir) / "sft_warm_start"


# ---------------------------------------------------------------------------------------------------------------
# One method (a worker)
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(method, cli, cfg, device, tokenizer, teacher, start, train_problems, counts):
    """The trainer of `method` (wrapped to count its tokens), with the student it trains."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trl_distill import GKDVariant, GKDVariantConfig, addition
    from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer
    from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer
    from trl_distill.trainers.okd import OKDConfig, OKDTrainer
    from trl_distill.trainers.redi import REDIConfig, REDITrainer

    steps, output_dir = cfg["steps"], str(Path(cli.output_dir) / method)
    logging_steps = max(1, steps // 50)
    if method in DISTILL_METHODS:
        args = trainer_args(output_dir, steps, cfg["batch_size"], cfg["learning_rate"], cli.seed, device,
                            lr_scheduler_type="cosine", warmup_steps=int(0.05 * steps), weight_decay=0.01,
                            max_grad_norm=1.0, logging_steps=logging_steps)
        student = build_model(tokenizer, cfg["student"], seed=cli.seed)
        if method == "sft":
            data = addition.sft_dataset(train_problems, format="prompt_completion")
            return counting(SFTTrainer, counts)(model=student, args=SFTConfig(**args), train_dataset=data,
                                                processing_class=tokenizer), student
        if method == "okd":
            data = addition.sft_dataset(train_problems, format="prompt_completion")
            config = OKDConfig(**args, teacher_update="online", alpha=0.1, teacher_learning_rate=2e-3)
            return counting(OKDTrainer, counts)(model=student, teacher_model=teacher, args=config,
                                                train_dataset=data, processing_class=tokenizer), student
        data = addition.sft_dataset(train_problems, format="messages")
        config = GKDVariantConfig(**args, loss_type=method.removeprefix("gkd_"), lmbda=0.5, beta=0.5,
                                  max_new_tokens=cfg["digits"] + 2)
        return counting(GKDVariant, counts)(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                            processing_class=tokenizer), student

    args = trainer_args(output_dir, steps, cfg["batch_size"], cfg["preference_learning_rate"], cli.seed, device,
                        lr_scheduler_type="linear", warmup_steps=int(0.1 * steps), logging_steps=logging_steps,
                        max_length=32)
    policy = start  # the worker's own copy of the warm start; a reference, where there is one, is a frozen copy
    pairs = addition.preference_dataset(train_problems, seed=cli.seed)
    if method == "distill_dpo":
        config = DistillDPOConfig(**args, mode="teacher_ref", beta=0.1)
        trainer = counting(DistillDPOTrainer, counts)(model=policy, teacher_model=teacher, args=config,
                                                      train_dataset=pairs, processing_class=tokenizer)
    elif method == "dpo":
        trainer = counting(DPOTrainer, counts)(model=policy, ref_model=copy.deepcopy(start),
                                               args=DPOConfig(**args, beta=0.1), train_dataset=pairs,
                                               processing_class=tokenizer)
    elif method == "adpo":
        lists = addition.listwise_dataset(train_problems, k=4, seed=cli.seed)
        trainer = counting(ADPOTrainer, counts)(model=policy, ref_model=copy.deepcopy(start), args=ADPOConfig(**args),
                                                train_dataset=lists, processing_class=tokenizer)
    elif method == "redi":
        trainer = counting(REDITrainer, counts)(model=policy, args=REDIConfig(**args, alpha=0.8),
                                                train_dataset=pairs, processing_class=tokenizer)
    else:
        raise ValueError(f"unknown method {method!r}")
    return trainer, policy


def run_method(method: str, cli) -> dict:
    """Train one method, measured as the module docstring says; returns its row and curves."""
    import datasets
    import torch
    from transformers import LlamaForCausalLM, PrinterCallback

    from trl_distill import addition

    datasets.disable_progress_bars()
    torch.set_num_threads(cli.threads)
    cfg, device = config_of(cli), resolve_device(cli.device)
    train_problems, eval_problems = addition.make_splits(seed=cli.seed, n_train=cfg["n_train"],
                                                         n_eval=cfg["n_eval"], digits=cfg["digits"])
    max_new_tokens = cfg["digits"] + 2  # the longest answer and <|end|>

    memory = PeakMemory(device)
    memory.start()  # baseline: after imports and problem lists, before any model or trainer exists
    wall_start = time.perf_counter()
    teacher, tokenizer = None, addition.make_tokenizer()
    if method in TEACHER_METHODS:  # the others never load it, so it is not in their memory
        teacher, tokenizer = ensure_teacher(cli, cfg, device)
    start = None
    if method in PREFERENCE_METHODS:
        start = LlamaForCausalLM.from_pretrained(warm_start_path(cli), dtype=torch.float32).to(device)
    counts: list[tuple[int, int]] = []
    trainer, _ = build_trainer(method, cli, cfg, device, tokenizer, teacher, start, train_problems, counts)

    def bracket(phase):
        memory.pause() if phase == "pause" else memory.resume()

    curve = make_exact_match_callback(tokenizer, eval_problems, cfg["eval_every"], on_measure=bracket,
                                      max_new_tokens=max_new_tokens)
    memory.pause()
    curve.record(0, trainer.model)
    memory.resume()
    curve.seconds = 0.0  # the step-0 point is not part of training
    trainer.add_callback(curve)
    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout (the worker's last line is its result)
    setup_seconds = time.perf_counter() - wall_start

    synchronize(device)
    train_start = time.perf_counter()
    trainer.train()
    synchronize(device)
    train_seconds = time.perf_counter() - train_start - curve.seconds
    peak = memory.stop()

    tokens = sum(n for _, n in counts)
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {
        "method": method,
        "label": LABELS[method],
        "family": "preference" if method in PREFERENCE_METHODS else "distill",
        "start": f"SFT warm start ({cfg['warmup_steps']} steps)" if method in PREFERENCE_METHODS else "fresh",
        "exact_match": curve.points[-1][1],
        "curve": curve.points,
        "loss": losses,
        "train_seconds": train_seconds,
        "eval_seconds": curve.seconds,
        "setup_seconds": setup_seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / train_seconds,
        "peak_bytes": peak,
        "peak_mib": mib(peak),
        "memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "CPU RSS high-water mark",
        "device": device,
        "steps": trainer.state.global_step,
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------


def prepare(cli, cfg, device) -> dict:
    """Teacher (cached) and, if a preference method runs, the SFT warm start saved for the workers; their scores."""
    import torch

    from trl_distill import addition
    from trl_distill.testing import train_sft

    torch.set_num_threads(cli.threads)
    train_problems, eval_problems = addition.make_splits(seed=cli.seed, n_train=cfg["n_train"],
                                                         n_eval=cfg["n_eval"], digits=cfg["digits"])
    max_new_tokens = cfg["digits"] + 2
    teacher, tokenizer = ensure_teacher(cli, cfg, device)
    info = {"teacher_exact_match": addition.exact_match(teacher, tokenizer, eval_problems,
                                                         max_new_tokens=max_new_tokens)}
    print(f"teacher {cfg['teacher']}: held-out exact match {info['teacher_exact_match']:.3f}", flush=True)
    if any(method in PREFERENCE_METHODS for method in cli.methods):
        start = time.time()
        student = build_model(tokenizer, cfg["student"], seed=cli.seed).to(device)
        train_sft(student, tokenizer, train_problems, steps=cfg["warmup_steps"], batch_size=cfg["batch_size"],
                  lr=cfg["learning_rate"], seed=cli.seed, warmup_steps=max(1, int(0.05 * cfg["warmup_steps"])),
                  log_every=0)
        student.save_pretrained(warm_start_path(cli))
        info["warm_start_exact_match"] = addition.exact_match(student, tokenizer, eval_problems,
                                                              max_new_tokens=max_new_tokens)
        info["warm_start_seconds"] = time.time() - start
        print(f"SFT warm start ({cfg['warmup_steps']} train_sft steps): held-out exact match "
              f"{info['warm_start_exact_match']:.3f} ({info['warm_start_seconds']:.0f} s)", flush=True)
    return info


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | starts from | held-out exact match | train time (s) | train tokens/s | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['start']} | {row['exact_match']:.1%} | {row['train_seconds']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['peak_mib']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    paths = []

    columns = 4
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.4 * lines), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        if row["loss"]:
            steps, values = zip(*row["loss"])
            ax.plot(steps, values, color="tab:blue" if row["family"] == "distill" else "tab:red")
        ax.set_title(row["label"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.supxlabel("optimizer step", fontsize=9)
    fig.supylabel("training loss (each method's own)", fontsize=9)
    fig.suptitle(f"run_all ({results['config']['size']}): training loss per method", fontsize=10)
    fig.tight_layout()
    path = str(Path(plot_dir) / "run_all_loss_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    families = [(name, [r for r in rows if r["family"] == name]) for name in ("distill", "preference")]
    families = [(name, rs) for name, rs in families if rs]
    fig, axes = plt.subplots(1, len(families), figsize=(6.2 * len(families), 4.2), squeeze=False)
    info = results["info"]
    for ax, (name, rs) in zip(axes.flat, families):
        for row in rs:
            steps, em = zip(*row["curve"])
            ax.plot(steps, [100 * x for x in em], marker=".", label=row["label"])
        ax.axhline(100 * info["teacher_exact_match"], color="gray", linestyle="--", label="teacher")
        if name == "preference" and "warm_start_exact_match" in info:
            ax.axhline(100 * info["warm_start_exact_match"], color="black", linestyle=":", label="SFT warm start")
        title = "from a fresh student" if name == "distill" else "from the SFT warm start"
        ax.set(xlabel="optimizer step", ylabel="held-out exact match (%)", title=title, ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = str(Path(plot_dir) / "run_all_metric_vs_steps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cli = parse_args(argv)
    if cli.worker:
        print(json.dumps(run_method(cli.worker, cli)))
        return {}

    import torch

    cfg, device = config_of(cli), resolve_device(cli.device)
    load_before, wall_start = os.getloadavg()[0], time.time()
    print(f"run_all size={cli.size} device={device} seed={cli.seed} torch {torch.__version__}, {cli.threads} "
          f"thread(s) of {os.cpu_count()} CPUs; student {cfg['student']}, teacher {cfg['teacher']}, {cfg['steps']} "
          f"steps x {cfg['batch_size']} prompts, eval every {cfg['eval_every']} on {cfg['n_eval']} held-out problems",
          flush=True)
    info = prepare(cli, cfg, device)

    rows = []
    for method in cli.methods:
        start = time.time()
        row = run_method(method, cli) if cli.in_process else launch_worker(__file__, argv, method)
        rows.append(row)
        print(f"{method}: exact match {row['exact_match']:.3f}, train {row['train_seconds']:.1f} s, "
              f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_mib']:.1f} MiB ({time.time() - start:.0f} s "
              f"in all)", flush=True)

    total = time.time() - wall_start
    results = {
        "config": {**vars(cli), **cfg, "device": device, "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "info": info,
        "rows": rows,
        "total_seconds": total,
        "load_average": [load_before, os.getloadavg()[0]],
        "columns": list(COLUMNS),
    }
    table = markdown_table(rows)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"Teacher held-out exact match: {info['teacher_exact_match']:.1%}."]
    if "warm_start_exact_match" in info:
        notes.append(f"SFT warm start of the preference methods ({cfg['warmup_steps']} `train_sft` steps): "
                     f"{info['warm_start_exact_match']:.1%}.")
    notes.append(f"Total {total:.0f} s on {device}; 1-minute load average {load_before:.2f} at start, "
                 f"{os.getloadavg()[0]:.2f} at end. Memory: "
                 + ("`torch.cuda.max_memory_allocated` over the allocation before the models."
                    if device.startswith("cuda") else "peak RSS over the RSS before the models."))
    (out / "run_all.md").write_text(table + "\n\n" + "\n".join(notes) + "\n")
    (out / "run_all.json").write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print()
    print("\n".join(notes))
    print(f"wrote {out / 'run_all.md'} and {out / 'run_all.json'}")
    plot_dir = cli.plot_dir if cli.plot_dir is not None else ("docs" if cli.size == "small" else cli.output_dir)
    if plot_dir:
        for path in plot(results, plot_dir):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
