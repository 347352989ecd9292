"""Training throughput and peak memory: `trl_distill.GKDVariant` (chunked loss) vs TRL's `GKDTrainer`, end to end.

    python benchmarks/gkd_vs_trl.py                       # V=32000, batch 8, prompt 64 + completion 192 words, CPU
    python benchmarks/gkd_vs_trl.py --lmbda 0             # off-policy only
    python benchmarks/gkd_vs_trl.py --sweep-lengths       # no memory-vs-length sweep

Both trainers get the same models (teacher and student built from the same seeds), the same data, the same batches
(same `seed`, same sampler) and the same loss: `loss_type="jsd"`, `beta=0.5` in GKDVariant equals TRL's
`generalized_jsd_loss` exactly (tests/test_gkd_variant.py::test_defaults_equal_trl_gkd_loss_and_grads); the
first logged loss of both runs is printed as a check. The only difference is how the loss is computed: TRL
materialises the student's and the teacher's full [B, T, V] logits, GKDVariant (default `loss_chunk_size=256`)
computes the divergence from the final hidden states in chunks of completion rows.

Vocabulary: a synthetic word-level tokenizer (`tokenizers` WordLevel) with exactly `--vocab-size` entries and a chat
template, so teacher and student heads have V columns and every column is used by both losses. Data: random words,
a `--prompt-len`-word user turn and a `--completion-len`-word assistant turn per row.

lmbda=0 trains on the dataset's completions; lmbda=1 has the student sample `--max-new-tokens` tokens per prompt
every step (on-policy), so generation time is part of the measured step time for both trainers alike.

What is measured, each trainer x lmbda in its own fresh Python process, `--repeats` rounds in which the processes run
one after the other (TRL, ours, TRL, ours, ...), so that a change in machine load hits both alike:

* throughput: completion tokens the loss is computed on (labels != -100 after the shift, counted inside
  `compute_loss`) during the timed steps, divided by the wall time of those steps (from the start of the first
  step after `--warmup-steps` to the end of the last one, via a `TrainerCallback`); the fastest round is
  reported (least disturbed by other load), all rounds are printed;
* peak memory (CPU): the kernel's resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`)
  minus the RSS measured after imports and data set-up, before the models are built: what models, optimizer state,
  gradients, activations, logits and loss temporaries needed at the worst moment of the whole run (the same approach
  as benchmarks/loss_memory.py). Also reported: the step peak, i.e. the high-water mark during the timed steps over
  the RSS at their start (optimizer state already allocated), which isolates the per-step temporaries.

Targets (issue #7, V >= 32k): GKDVariant tokens/s >= 1.2x TRL's, GKDVariant peak memory <= 0.5x TRL's.

The sweep (lmbda=0, 1 warm-up + 1 timed step) measures the whole-run peak for several completion lengths for both
trainers and plots it (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# benchmarks/ is on sys.path when a script here runs
from _common import launch_worker, make_word_tokenizer, random_words
from _rss import reset_peak_rss, rss_bytes

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

THROUGHPUT_TARGET = 1.2  # ours / TRL completion tokens per second, at least
MEMORY_TARGET = 0.5  # ours / TRL peak memory, at most
TRAINERS = ("trl", "ours")
NAMES = {"trl": "TRL GKDTrainer (dense)", "ours": "GKDVariant (chunked)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64, help="words in the user turn")
    parser.add_argument("--completion-len", type=int, default=192, help="words in the assistant turn (lmbda=0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens the student samples (lmbda=1)")
    parser.add_argument("--lmbda", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--teacher", default="2x256", help="layers x hidden size")
    parser.add_argument("--student", default="2x128", help="layers x hidden size")
    parser.add_argument("--chunk-size", type=int, default=256, help="GKDVariant loss_chunk_size")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine two contended threads are far slower)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of every trainer x lmbda, alternated; the fastest run's tokens/s is reported")
    parser.add_argument("--sweep-lengths", type=int, nargs="*", default=[64, 128, 256, 512],
                        help="completion lengths of the memory sweep (lmbda=0); none: no sweep")
    parser.add_argument("--plot", default="docs/gkd_memory_vs_length.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "<trainer>"
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Worker: one trainer, one lmbda, in a fresh process
# ---------------------------------------------------------------------------------------------------------------


def make_dataset(args, completion_len: int, rows: int):
    import random

    from datasets import Dataset

    rng = random.Random(args.seed)

    def text(n):
        return random_words(rng, args.vocab_size, n)

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": text(args.prompt_len)},
                      {"role": "assistant", "content": text(completion_len)}]}
        for _ in range(rows)
    ])


def run_worker(args, trainer_kind: str, lmbda: float, completion_len: int) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_distill import GKDVariant, GKDVariantConfig
    from trl_distill.testing import tiny_causal_lm

    steps = args.warmup_steps + args.timed_steps
    tokenizer = make_word_tokenizer(args.vocab_size)
    dataset = make_dataset(args, completion_len, args.batch_size * steps)
    longest = args.prompt_len + max(completion_len, args.max_new_tokens) + 8

    # Baseline: after imports and data, before the models exist (everything from here on is training's memory).
    reset_peak_rss()
    baseline = rss_bytes("VmRSS")

    def model(spec: str, seed: int):
        layers, hidden = (int(x) for x in spec.split("x"))
        return tiny_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed,
                              max_position_embeddings=longest)

    teacher, student = model(args.teacher, seed=1), model(args.student, seed=2)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="gkd_vs_trl_"), bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, learning_rate=1e-4,
        per_device_train_batch_size=args.batch_size, max_steps=steps, dataloader_num_workers=0, disable_tqdm=True,
        lmbda=lmbda, beta=0.5, max_new_tokens=args.max_new_tokens, max_length=longest, seed=args.seed,
    )
    counts: list[tuple[int, int]] = []  # (global step, completion tokens in the loss)

    def counting(base):
        class Counting(base):
            def compute_loss(self, model, inputs, *rest, **kwargs):
                counts.append((self.state.global_step, int((inputs["labels"][:, 1:] != -100).sum())))
                return super().compute_loss(model, inputs, *rest, **kwargs)

        return Counting

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                marks["warmup_peak"] = rss_bytes("VmHWM")
                marks["timed_rss"] = rss_bytes("VmRSS")
                reset_peak_rss()
                marks["start"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == steps:
                marks["end"] = time.perf_counter()
                marks["timed_peak"] = rss_bytes("VmHWM")

    if trainer_kind == "trl":
        trainer = counting(GKDTrainer)(
            model=student, teacher_model=teacher, args=GKDConfig(**common), train_dataset=dataset,
            processing_class=tokenizer, callbacks=[Clock()],
        )
    else:
        trainer = counting(GKDVariant)(
            model=student, teacher_model=teacher,
            args=GKDVariantConfig(loss_type="jsd", loss_chunk_size=args.chunk_size, **common),
            train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()],
        )
    trainer.train()

    timed_tokens = sum(n for step, n in counts if step >= args.warmup_steps)
    seconds = marks["end"] - marks["start"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "tokens_per_s": timed_tokens / seconds,
        "timed_tokens": timed_tokens,
        "seconds": seconds,
        "peak_bytes": max(marks["warmup_peak"], marks["timed_peak"]) - baseline,
        "step_peak_bytes": marks["timed_peak"] - marks["timed_rss"],
        "first_loss": losses[0],
        "seq_len": args.prompt_len + completion_len,
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------


def _launch(argv: list[str], trainer_kind: str, lmbda: float, completion_len: int) -> dict:
    return launch_worker(__file__, argv, f"{trainer_kind}:{lmbda}:{completion_len}")


def _mib(n: float) -> float:
    return n / 2**20


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        kind, lmbda, completion_len = args.worker.split(":")
        print(json.dumps(run_worker(args, kind, float(lmbda), int(completion_len))))
        return 0

    import torch

    print(f"torch {torch.__version__}, CPU, {args.threads} threads ({os.cpu_count()} CPUs), V={args.vocab_size}, "
          f"batch {args.batch_size}, prompt {args.prompt_len} + completion {args.completion_len} tokens "
          f"(lmbda=1: {args.max_new_tokens} sampled), teacher {args.teacher}, student {args.student}, "
          f"chunk {args.chunk_size}, {args.warmup_steps} warm-up + {args.timed_steps} timed steps", flush=True)
    load_before, start = os.getloadavg()[0], time.time()
    runs = {(lmbda, kind): [] for lmbda in args.lmbda for kind in TRAINERS}
    for round_ in range(args.repeats):
        for lmbda in args.lmbda:
            for kind in TRAINERS:
                r = _launch(argv, kind, lmbda, args.completion_len)
                runs[lmbda, kind].append(r)
                print(f"  round {round_ + 1}: lmbda={lmbda:g} {NAMES[kind]}: {r['tokens_per_s']:.0f} tok/s, "
                      f"peak {_mib(r['peak_bytes']):.0f} MiB, step peak {_mib(r['step_peak_bytes']):.0f} MiB",
                      flush=True)
    # Throughput: the fastest round (least disturbed by other load). Memory: the largest peak seen.
    results = {}
    for key, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        results[key] = {**best, "peak_bytes": max(r["peak_bytes"] for r in rs),
                        "step_peak_bytes": max(r["step_peak_bytes"] for r in rs),
                        "all_tokens_per_s": [r["tokens_per_s"] for r in rs]}

    print()
    print(f"{'lmbda':>5}  {'trainer':<24}{'tokens/s':>10}{'timed tokens':>14}{'time s':>8}{'peak MiB':>10}"
          f"{'step peak MiB':>15}{'first loss':>12}  all rounds tok/s")
    for (lmbda, kind), r in results.items():
        print(f"{lmbda:>5g}  {NAMES[kind]:<24}{r['tokens_per_s']:>10.0f}{r['timed_tokens']:>14}{r['seconds']:>8.2f}"
              f"{_mib(r['peak_bytes']):>10.0f}{_mib(r['step_peak_bytes']):>15.0f}{r['first_loss']:>12.6f}  "
              + " ".join(f"{t:.0f}" for t in r["all_tokens_per_s"]))
    print()
    all_pass = True
    for lmbda in args.lmbda:
        ours, trl = results[lmbda, "ours"], results[lmbda, "trl"]
        speed = ours["tokens_per_s"] / trl["tokens_per_s"]
        memory = ours["peak_bytes"] / trl["peak_bytes"]
        step_memory = ours["step_peak_bytes"] / trl["step_peak_bytes"]
        speed_ok, memory_ok = speed >= THROUGHPUT_TARGET, memory <= MEMORY_TARGET
        all_pass &= speed_ok and memory_ok
        print(f"lmbda={lmbda:g}: tokens/s ours/TRL {speed:.2f}x (target >= {THROUGHPUT_TARGET}) "
              f"{'PASS' if speed_ok else 'FAIL'} | peak memory ours/TRL {memory:.3f} (target <= {MEMORY_TARGET}) "
              f"{'PASS' if memory_ok else 'FAIL'} | step peak ours/TRL {step_memory:.3f}")

    if args.sweep_lengths:
        print()
        print(f"memory sweep (lmbda=0, 1 warm-up + 1 timed step): peak MiB by sequence length (prompt "
              f"{args.prompt_len} + completion)")
        sweep_argv = argv + ["--warmup-steps", "1", "--timed-steps", "1", "--repeats", "1"]
        sweep = {kind: [] for kind in TRAINERS}
        print(f"{'seq len':>8}{'TRL dense':>12}{'ours chunked':>14}{'ratio':>8}", flush=True)
        for length in args.sweep_lengths:
            for kind in TRAINERS:
                sweep[kind].append(_launch(sweep_argv, kind, 0.0, length))
            trl, ours = sweep["trl"][-1], sweep["ours"][-1]
            print(f"{trl['seq_len']:>8}{_mib(trl['peak_bytes']):>12.0f}{_mib(ours['peak_bytes']):>14.0f}"
                  f"{ours['peak_bytes'] / trl['peak_bytes']:>8.3f}", flush=True)
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            labels = {"trl": NAMES["trl"], "ours": f"{NAMES['ours']}, chunk {args.chunk_size}"}
            for kind, marker in (("trl", "o"), ("ours", "s")):
                ax.plot([r["seq_len"] for r in sweep[kind]], [_mib(r["peak_bytes"]) for r in sweep[kind]],
                        marker=marker, label=labels[kind])
            ax.set_xlabel(f"sequence length (prompt {args.prompt_len} + completion), batch {args.batch_size}")
            ax.set_ylabel("peak memory over baseline (MiB, CPU RSS)")
            ax.set_title(f"GKD training peak memory, V={args.vocab_size}, jsd beta=0.5")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"plot: {args.plot}")

    print(f"\n1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"total {time.time() - start:.0f} s")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
