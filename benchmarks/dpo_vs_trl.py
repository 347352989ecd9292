"""Training throughput and peak memory of the DPO-style trainers against TRL's `DPOTrainer`, side by side.

    python benchmarks/dpo_vs_trl.py                      # V=32000, batch 8 pairs, 64 + 2 x 192 words, 3 rounds
    python benchmarks/dpo_vs_trl.py --device cuda        # the same on a GPU (memory: torch.cuda.max_memory_allocated)
    python benchmarks/dpo_vs_trl.py --trainers trl_teacher distill   # one comparison only

Trainers (same student and teacher, built from the same seeds; same data, same batches, same seed and sampler):

* ``trl_teacher``: TRL's `DPOTrainer(ref_model=teacher)` (sigmoid, beta 0.1);
* ``distill``: `DistillDPOTrainer(teacher_model=teacher)`, ``mode="teacher_ref"`` with no extra term: the same loss
  (the first logged loss of both is printed as a check); the ratio to read is what the wrapper costs;
* ``trl_self``: TRL's `DPOTrainer` with the usual reference, a frozen copy of the student;
* ``redi``: `REDITrainer` (alpha 0.8): no reference model, no reference forward.

Ratios printed: distill / trl_teacher, redi / trl_self and redi / trl_teacher, for tokens/s and peak memory.

Vocabulary: the synthetic word-level tokenizer of benchmarks/gkd_vs_trl.py (`_common.make_word_tokenizer`) with
exactly `--vocab-size` entries, so both heads have V columns; random words, a `--prompt-len`-word user turn and
`--completion-len`-word chosen and rejected assistant turns per row. Untied Llama models (teacher 2x256, student
2x128 by default): mostly embedding and head at V=32k, as in gkd_vs_trl.py.

Protocol (as gkd_vs_trl.py): each trainer runs in a fresh Python process, `--repeats` rounds in which the processes
run one after the other (trl_teacher, distill, trl_self, redi, trl_teacher, ...), so that a change in machine load
hits all alike.

* throughput: completion tokens of chosen and rejected (``completion_mask``, counted in `compute_loss`) in the timed
  steps over their wall time (from the start of the first step after `--warmup-steps` to the end of the last);
  the fastest round is reported, all rounds are printed;
* peak memory: CPU, the resident-set high-water mark (`benchmarks/_rss.py`) minus the RSS before the models are
  built, i.e. models, optimizer state, gradients, activations; CUDA, `torch.cuda.max_memory_allocated()` over the
  allocation at that point. The largest of the rounds is reported. Also: the step peak, the mark during the timed
  steps over the memory at their start (per-step temporaries only).

TRL 1.16's fused LM head, which all four use, projects 32,768 positions per chunk: below that many positions per
batch every forward still builds the full logits once, so the reference model's absence saves REDI its weights and
its forward time, not the per-step peak (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    PeakMemory,
    counting,
    launch_worker,
    make_word_tokenizer,
    mib,
    random_words,
    synchronize,
    trainer_args,
)

TRAINERS = ("trl_teacher", "distill", "trl_self", "redi")
NAMES = {
    "trl_teacher": "TRL DPOTrainer(ref_model=teacher)",
    "distill": "DistillDPOTrainer(teacher_ref)",
    "trl_self": "TRL DPOTrainer(ref=student copy)",
    "redi": "REDITrainer (no reference)",
}
RATIOS = (("distill", "trl_teacher"), ("redi", "trl_self"), ("redi", "trl_teacher"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64, help="words in the user turn")
    parser.add_argument("--completion-len", type=int, default=192, help="words in each of chosen and rejected")
    parser.add_argument("--teacher", default="2x256", help="layers x hidden size")
    parser.add_argument("--student", default="2x128", help="layers x hidden size")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every trainer, alternated")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_pairs(args, rows: int):
    import random

    from datasets import Dataset

    rng = random.Random(args.seed)

    def words(n):
        return random_words(rng, args.vocab_size, n)

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": words(args.prompt_len)}],
         "chosen": [{"role": "assistant", "content": words(args.completion_len)}],
         "rejected": [{"role": "assistant", "content": words(args.completion_len)}]}
        for _ in range(rows)
    ])


def completion_tokens(inputs) -> int:
    return int((inputs["completion_mask"] != 0).sum())


def run_worker(args, kind: str) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_distill.testing import tiny_causal_lm
    from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer
    from trl_distill.trainers.redi import REDIConfig, REDITrainer

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps = args.warmup_steps + args.timed_steps
    tokenizer = make_word_tokenizer(args.vocab_size)
    dataset = make_pairs(args, args.batch_size * steps)
    longest = args.prompt_len + args.completion_len + 8

    # Baseline: after imports and data, before the models exist.
    memory, step_memory = PeakMemory(device), PeakMemory(device)
    memory.start()

    def model(spec: str, seed: int):
        layers, hidden = (int(x) for x in spec.split("x"))
        return tiny_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed,
                              max_position_embeddings=longest)

    student = model(args.student, seed=2)
    common = trainer_args(tempfile.mkdtemp(prefix="dpo_vs_trl_"), steps, args.batch_size, 1e-4, args.seed, device,
                          logging_steps=1, max_length=longest)
    counts: list[tuple[int, int]] = []
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                synchronize(device)
                memory.pause()
                step_memory.start()
                marks["start"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == steps:
                synchronize(device)
                marks["end"] = time.perf_counter()
                marks["step_peak"] = step_memory.stop()

    kwargs = dict(train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    if kind == "trl_teacher":
        trainer = counting(DPOTrainer, counts, completion_tokens)(
            model=student, ref_model=model(args.teacher, seed=1), args=DPOConfig(**common, beta=0.1), **kwargs)
    elif kind == "distill":
        trainer = counting(DistillDPOTrainer, counts, completion_tokens)(
            model=student, teacher_model=model(args.teacher, seed=1),
            args=DistillDPOConfig(**common, mode="teacher_ref", beta=0.1), **kwargs)
    elif kind == "trl_self":
        trainer = counting(DPOTrainer, counts, completion_tokens)(
            model=student, ref_model=copy.deepcopy(student), args=DPOConfig(**common, beta=0.1), **kwargs)
    elif kind == "redi":
        trainer = counting(REDITrainer, counts, completion_tokens)(
            model=student, args=REDIConfig(**common, alpha=0.8), **kwargs)
    else:
        raise ValueError(kind)
    trainer.train()
    peak = memory.stop()

    timed_tokens = sum(n for step, n in counts if step >= args.warmup_steps)
    seconds = marks["end"] - marks["start"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "kind": kind,
        "tokens_per_s": timed_tokens / seconds,
        "timed_tokens": timed_tokens,
        "seconds": seconds,
        "peak_bytes": peak,
        "step_peak_bytes": marks["step_peak"],
        "first_loss": losses[0],
        "device": device,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        import json

        print(json.dumps(run_worker(args, args.worker)))
        return 0

    import torch

    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {device}, {args.threads} thread(s) ({os.cpu_count()} CPUs), "
          f"V={args.vocab_size}, "
          f"batch {args.batch_size} pairs, prompt {args.prompt_len} + chosen/rejected {args.completion_len} words, "
          f"teacher {args.teacher}, student {args.student}, {args.warmup_steps} warm-up + {args.timed_steps} timed "
          f"steps, {args.repeats} rounds", flush=True)
    load_before, start = os.getloadavg()[0], time.time()
    runs = {kind: [] for kind in args.trainers}
    for round_ in range(args.repeats):
        for kind in args.trainers:
            r = launch_worker(__file__, argv, kind)
            runs[kind].append(r)
            print(f"  round {round_ + 1}: {NAMES[kind]:<36} {r['tokens_per_s']:8.0f} tok/s, peak "
                  f"{mib(r['peak_bytes']):7.0f} MiB, step peak {mib(r['step_peak_bytes']):6.0f} MiB, first loss "
                  f"{r['first_loss']:.6f}", flush=True)
    # Throughput: the fastest round (least disturbed by other load). Memory: the largest peak seen.
    results = {}
    for kind, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        results[kind] = {**best, "peak_bytes": max(r["peak_bytes"] for r in rs),
                         "step_peak_bytes": max(r["step_peak_bytes"] for r in rs),
                         "all_tokens_per_s": [r["tokens_per_s"] for r in rs]}

    memory_kind = "CUDA max allocated" if device.startswith("cuda") else "CPU RSS"
    print(f"\n| trainer | tokens/s (best; all rounds) | timed tokens | peak MiB ({memory_kind}) | step peak MiB | "
          "first loss |\n|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {NAMES[kind]} | {r['tokens_per_s']:.0f} ({', '.join(f'{t:.0f}' for t in r['all_tokens_per_s'])}) | "
              f"{r['timed_tokens']} | {mib(r['peak_bytes']):.0f} | {mib(r['step_peak_bytes']):.0f} | "
              f"{r['first_loss']:.6f} |")
    print("\n| ratio | tokens/s | peak memory | step peak |\n|---|---|---|---|")
    for ours, base in RATIOS:
        if ours in results and base in results:
            a, b = results[ours], results[base]
            print(f"| {NAMES[ours]} / {NAMES[base]} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                  f"{a['peak_bytes'] / b['peak_bytes']:.3f} | {a['step_peak_bytes'] / b['step_peak_bytes']:.3f} |")
    if "distill" in results and "trl_teacher" in results:
        same = results["distill"]["first_loss"] == results["trl_teacher"]["first_loss"]
        print(f"\nfirst logged loss, DistillDPO vs TRL with ref=teacher: {results['distill']['first_loss']:.6f} vs "
              f"{results['trl_teacher']['first_loss']:.6f} ({'identical' if same else 'DIFFERENT'})")
    print(f"1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
