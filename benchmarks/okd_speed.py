"""Step time of OKD vs TRL's on-policy GKD (lmbda=1), frozen-teacher KD and SFT, on the same models, data and batch.

    python benchmarks/okd_speed.py                  # batch 64, 20 timed steps after 3 warm-up steps, CPU
    python benchmarks/okd_speed.py --device cuda    # same on a GPU
    python benchmarks/okd_speed.py --threads 1 --completion-lengths 4 16 64 128 256   # completion-length sweep
    python benchmarks/okd_speed.py --threads 1 --completion-lengths 16 64 256 \
        --teacher-shape 8x240 --student-shape 6x192 --batch-size 16                  # a 2x teacher, as the paper's

Default run. Models: `tiny_teacher` (4 layers, 128 wide) and `tiny_student` (2 layers, 48 wide) of the shipped
addition task, randomly initialised from fixed seeds (step time does not depend on what they have learned). Data: the
task's conversational (`messages`) training set; every trainer gets the same batches (same seed, same collation of
the same rows), fp32, no gradient checkpointing.

* ``gkd_onpolicy``: TRL's `GKDTrainer` with ``lmbda=1``: every step the student samples the completions
  (``max_new_tokens`` = the longest completion of the task, so the sequences are as long as the dataset's), then
  teacher and student forwards and the student's backward (TRL's dense JSD loss, ``beta=0.5``).
* ``okd``: `OKDTrainer` (forward KL student loss, teacher LoRA r=32 on q_proj/v_proj trained with the teacher
  loss; one forward of each model, one backward reaching both, two optimizer steps).
* ``kd_frozen``: `OKDTrainer(teacher_update="frozen")`, plain off-policy KD.
* ``sft``: TRL's `SFTTrainer`.

Step time = wall time from `on_step_begin` to `on_step_end` (generation, forwards, backward, optimizer steps; the
batch is fetched and collated before `on_step_begin`, so collation is not included), median over the timed steps;
all variants run one after the other in this process. The line to read is ``okd / gkd_onpolicy`` (target <= 0.25,
the issue's reading of the paper's claim; the paper's own table gives OKD 4.2 vs GKD 10.5 relative training time,
0.40) and ``okd / kd_frozen`` (paper: about 1.6-2.5).

Completion-length sweep (``--completion-lengths L1 L2 ...``). For each L, synthetic rows: the task's prompts (8 tokens
with the chat template) and a random digit string of L - 1 characters plus the end token as the completion, so every
sequence is 8 + L tokens and L of them are completion tokens. OKD and frozen KD train on them in prompt-completion
form (the loss covers the L completion tokens); on-policy GKD gets the same rows as ``messages``, samples exactly L
new tokens per prompt (``max_new_tokens = min_new_tokens = L``, so the end token cannot stop it early) and trains on
prompt + L tokens with the loss on the L sampled ones. The tokens each trainer's loss saw are counted and printed, so
the equal workload is checked, not assumed. Models are built with ``--teacher-shape`` / ``--student-shape``
(LAYERSxWIDTH, 4 heads, MLP 4x wide; defaults the task's 4x128 and 2x48) with enough positions for 8 + L tokens. To
keep the ratio fair on a shared machine, the variants are interleaved: ``--rounds`` rounds, each building fresh
trainers and timing ``--steps`` steps after ``--warmup`` (defaults 4 and 1 in the sweep), the order reversed every
other round. Each step's wall time and, on CPU, the process's CPU time are recorded (with ``--threads 1`` the CPU
time is the compute the step needed, whatever else the machine runs); a round's ratio compares the two variants'
median step times in that round, and the tables give the median over rounds and their range, for each clock. The
crossover is where the measured ratio first drops below 1 and below ``RATIO_TARGET``; past the longest length, both
step times are extended as straight lines through the two longest lengths and the crossover of those lines is
printed as an extrapolation only. ``--report SWEEP_JSON`` prints the tables of a saved sweep again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import trainer_args  # noqa: E402  (sets the offline environment before transformers is imported)

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from trl_distill.addition import make_splits, make_tokenizer, prompt_text, sft_dataset  # noqa: E402
from trl_distill.testing import tiny_causal_lm, tiny_student, tiny_teacher  # noqa: E402
from trl_distill.trainers.okd import OKDConfig, OKDTrainer  # noqa: E402

RATIO_TARGET = 0.25  # okd / gkd_onpolicy step time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (per round in the sweep); default 20, sweep 4")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 3, sweep 1")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="GKD's generation length (answer + end)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Trainer's default GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: gkd_onpolicy okd kd_frozen sft; sweep: gkd_onpolicy okd kd_frozen")
    parser.add_argument("--completion-lengths", type=int, nargs="+", default=None, metavar="L",
                        help="sweep: time every variant on synthetic rows with L completion tokens, for each L")
    parser.add_argument("--rounds", type=int, default=3, help="sweep: interleaved rounds per length")
    parser.add_argument("--teacher-shape", default="4x128", help="sweep: teacher LAYERSxWIDTH (task: 4x128)")
    parser.add_argument("--student-shape", default="2x48", help="sweep: student LAYERSxWIDTH (task: 2x48)")
    parser.add_argument("--report", metavar="SWEEP_JSON",
                        help="run nothing: print the tables of a sweep's saved --output file again")
    parser.add_argument("--output", default=None, help="default outputs/okd_speed.json (sweep: okd_speed_sweep.json)")
    args = parser.parse_args(argv)
    sweep = args.completion_lengths is not None
    if args.steps is None:
        args.steps = 4 if sweep else 20
    if args.warmup is None:
        args.warmup = 1 if sweep else 3
    if args.variants is None:
        args.variants = ["gkd_onpolicy", "okd", "kd_frozen"] + ([] if sweep else ["sft"])
    if args.output is None:
        args.output = "outputs/okd_speed_sweep.json" if sweep else "outputs/okd_speed.json"
    if sweep and (min(args.completion_lengths) < 1 or "sft" in args.variants):
        parser.error("--completion-lengths: lengths must be >= 1, and the sweep times gkd_onpolicy, okd, kd_frozen")
    return args


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, and the process's CPU time over it (all its threads)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(args.device)
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(args.device)
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def common_args(args, output_dir):
    return trainer_args(output_dir, args.warmup + args.steps, args.batch_size, learning_rate=1e-3, seed=0,
                        device=args.device, logging_steps=10**6)


def build(variant, args, tokenizer, dataset, output_dir):
    student = tiny_student(tokenizer, seed=0)
    teacher = tiny_teacher(tokenizer, seed=1)
    common = common_args(args, output_dir)
    if variant == "gkd_onpolicy":
        config = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.max_new_tokens)
        return GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    if variant in ("okd", "kd_frozen"):
        config = OKDConfig(**common, teacher_update="online" if variant == "okd" else "frozen")
        return OKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    if variant == "sft":
        return SFTTrainer(model=student, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------------------- length sweep
PROMPT_TOKENS = 8  # "<|user|>ab+cd=<|assistant|>" with the chat template


def parse_shape(text):
    layers, width = (int(x) for x in text.lower().split("x"))
    return layers, width


def shaped_model(tokenizer, shape, seed, positions):
    """`tiny_causal_lm` of LAYERSxWIDTH (4 heads, MLP 4x wide), with room for `positions` tokens."""
    layers, width = parse_shape(shape)
    return tiny_causal_lm(tokenizer, hidden_size=width, num_layers=layers, num_heads=4, seed=seed,
                          max_position_embeddings=max(64, positions))


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def sweep_rows(problems, length, seed=0):
    """The task's prompts with a random digit completion of `length` - 1 characters (the template adds the end)."""
    rng = random.Random(seed)
    prompts, completions, messages = [], [], []
    for a, b in problems:
        user = [{"role": "user", "content": prompt_text(a, b)}]
        assistant = [{"role": "assistant", "content": "".join(rng.choice("0123456789") for _ in range(length - 1))}]
        prompts.append(user)
        completions.append(assistant)
        messages.append(user + assistant)
    return (datasets.Dataset.from_dict({"prompt": prompts, "completion": completions}),
            datasets.Dataset.from_dict({"messages": messages}))


def count_loss_tokens(trainer, counts):
    """Record (sequence length, completion tokens in the loss) of every `compute_loss` call."""
    compute_loss = trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        counts.append((inputs["input_ids"].shape[1], int((inputs["labels"][:, 1:] != -100).sum())))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted


def build_sweep(variant, args, length, tokenizer, data, output_dir):
    positions = PROMPT_TOKENS + length + 8
    student = shaped_model(tokenizer, args.student_shape, seed=0, positions=positions)
    teacher = shaped_model(tokenizer, args.teacher_shape, seed=1, positions=positions)
    common = dict(common_args(args, output_dir), max_length=positions)
    prompt_completion, messages = data
    if variant == "gkd_onpolicy":
        config = GKDConfig(**common, lmbda=1.0, max_new_tokens=length)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=messages,
                             processing_class=tokenizer)
        # Exactly `length` sampled tokens per prompt: the end token is masked out until then.
        for key in ("max_new_tokens", "min_new_tokens"):
            setattr(trainer.generation_config, key, length)
            trainer.generation_kwargs[key] = length
        return trainer
    if variant in ("okd", "kd_frozen"):
        config = OKDConfig(**common, teacher_update="online" if variant == "okd" else "frozen")
        return OKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=prompt_completion,
                          processing_class=tokenizer)
    raise ValueError(f"unknown sweep variant {variant!r}")


def crossover(lengths, ratios, threshold):
    """First measured length whose ratio is below `threshold`, and the last one at or above it before that."""
    for i, ratio in enumerate(ratios):
        if ratio < threshold:
            return (lengths[i - 1] if i else None), lengths[i]
    return None


def extrapolated_crossover(okd_seconds, gkd_seconds, gkd_slope, marginal, threshold):
    """Extra completion tokens past the last measured length at which straight-line extensions of both step times
    (slopes from the last two lengths) put okd / gkd_onpolicy below `threshold`; None when they never do (the ratio
    of the lines tends to `marginal`, the ratio of the slopes).

    Solves okd + x * okd_slope = threshold * (gkd + x * gkd_slope), with okd_slope = marginal * gkd_slope.
    """
    if marginal >= threshold or gkd_slope <= 0:
        return None
    return (okd_seconds - threshold * gkd_seconds) / (gkd_slope * (threshold - marginal))


def run_sweep(args):
    lengths = sorted(set(args.completion_lengths))
    variants = args.variants
    datasets.disable_progress_bars()
    # Wall time is what a user waits for. On a CPU shared with other jobs it also counts the time the process waits for
    # a core, so the process's CPU time (all threads) is recorded too: with one thread it is the compute the step
    # needed, and far less sensitive to the other jobs. On a GPU only wall time means anything.
    clocks = ["wall", "cpu"] if args.device == "cpu" else ["wall"]
    train, _ = make_splits(seed=0)
    rows = args.batch_size * (args.warmup + args.steps)
    problems = (train * (rows // len(train) + 1))[:rows]
    results = {clock: {} for clock in clocks}  # clock -> length -> variant -> per-round medians (seconds)
    tokens = {}  # length -> variant -> [(sequence length, completion tokens in the loss)] seen in the timed steps
    sizes = None
    start_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            tokenizer = make_tokenizer(model_max_length=PROMPT_TOKENS + length + 8)
            data = sweep_rows(problems, length)
            for clock in clocks:
                results[clock][length] = {v: [] for v in variants}
            tokens[length] = {}
            for round_index in range(args.rounds):
                order = variants if round_index % 2 == 0 else variants[::-1]
                for variant in order:
                    trainer = build_sweep(variant, args, length, tokenizer, data, str(Path(tmp) / variant))
                    if sizes is None:
                        sizes = {"student": parameter_count(trainer.model),
                                 "teacher": parameter_count(trainer.teacher_model)}
                    timer, counts = StepTimer(), []
                    trainer.add_callback(timer)
                    trainer.remove_callback(PrinterCallback)
                    count_loss_tokens(trainer, counts)
                    trainer.train()
                    timed = {"wall": timer.times[args.warmup:], "cpu": timer.cpu_times[args.warmup:]}
                    for clock in clocks:
                        results[clock][length][variant].append(statistics.median(timed[clock]))
                    tokens[length][variant] = sorted(set(tokens[length].get(variant, [])) | set(counts[args.warmup:]))
                    del trainer
            for clock in clocks:
                line = ", ".join(f"{v} " + "/".join(f"{1000 * t:.0f}" for t in results[clock][length][v])
                                 for v in variants)
                print(f"L={length}: per-round median step ms ({clock}): {line}", flush=True)
            print(f"  ({time.time() - start_all:.0f} s so far, load average {os.getloadavg()[0]:.1f})", flush=True)

    summary = {"config": vars(args), "parameters": sizes, "threads": torch.get_num_threads(), "clocks": clocks,
               "tokens_seen": tokens, "per_round_seconds": results, "seconds": time.time() - start_all}
    summary.update(report_all(summary))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}  (sweep took {summary['seconds']:.0f} s)")


def report_all(summary):
    """Print the sweep's setup, token check, tables and crossovers from its data (fresh, or read back by --report)."""
    config, sizes, clocks = summary["config"], summary["parameters"], summary["clocks"]
    # JSON turns the integer length keys into strings: turn them back.
    tokens = {int(length): {v: [tuple(t) for t in seen] for v, seen in by_variant.items()}
              for length, by_variant in summary["tokens_seen"].items()}
    results = {clock: {int(length): by_variant for length, by_variant in by_length.items()}
               for clock, by_length in summary["per_round_seconds"].items()}
    lengths = sorted(tokens)
    variants = [v for v in config["variants"] if v in tokens[lengths[0]]]
    print(f"\nsweep: teacher {config['teacher_shape']} ({sizes['teacher'] / 1e6:.2f}M parameters), student "
          f"{config['student_shape']} ({sizes['student'] / 1e6:.3f}M; teacher/student "
          f"{sizes['teacher'] / sizes['student']:.1f}x), batch {config['batch_size']}, device {config['device']}, "
          f"{summary.get('threads', config['threads'])} threads, {config['rounds']} rounds x {config['steps']} "
          f"timed steps (after {config['warmup']}) per variant and length")
    print("tokens per step (sequence length, completion tokens in the loss): " + "; ".join(
        f"L={length}: " + ", ".join(f"{v} {tokens[length][v]}" for v in variants) for length in lengths))
    for length in lengths:
        want = [(PROMPT_TOKENS + length, config["batch_size"] * length)]
        for v in variants:
            if tokens[length][v] != want:
                print(f"WARNING: L={length} {v} saw {tokens[length][v]}, expected {want}")
    pairs = [(a, b) for a, b in (("okd", "gkd_onpolicy"), ("okd", "kd_frozen")) if a in variants and b in variants]
    return {clock: report_sweep(clock, lengths, variants, pairs, results[clock]) for clock in clocks}


def report_sweep(clock, lengths, variants, pairs, results):
    """Table of median step times and per-round ratios for one clock, then the okd / gkd_onpolicy crossovers."""

    def median(length, variant):
        return statistics.median(results[length][variant])

    def ratios(length, a, b):
        return [x / y for x, y in zip(results[length][a], results[length][b])]

    header = "| L (completion tokens) | sequence | " + " | ".join(f"{v} (ms)" for v in variants)
    header += "".join(f" | {a} / {b} (range)" for a, b in pairs) + " |"
    print(f"\n{clock} time, median over rounds of each round's median step\n")
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    rows = []
    for length in lengths:
        row = {"completion_tokens": length, "sequence_tokens": PROMPT_TOKENS + length,
               "median_step_seconds": {v: median(length, v) for v in variants}}
        cells = [f"{1000 * median(length, v):.0f}" for v in variants]
        for a, b in pairs:
            r = ratios(length, a, b)
            row[f"{a}_over_{b}"], row[f"{a}_over_{b}_rounds"] = statistics.median(r), r
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        print(f"| {length} | {PROMPT_TOKENS + length} | " + " | ".join(cells) + " |")
        rows.append(row)
    summary = {"rows": rows}
    if ("okd", "gkd_onpolicy") not in pairs:
        return summary
    measured = [row["okd_over_gkd_onpolicy"] for row in rows]
    print()
    for threshold in (1.0, RATIO_TARGET):
        found = crossover(lengths, measured, threshold)
        if found is None:
            text = f"never drops below {threshold:g} in the measured range L = {lengths[0]}..{lengths[-1]}"
        elif found[0] is None:
            text = f"is already below {threshold:g} at L = {found[1]}"
        else:
            text = f"drops below {threshold:g} between L = {found[0]} and L = {found[1]} (measured)"
        print(f"[{clock}] okd / gkd_onpolicy {text}")
        summary[f"crossover_below_{threshold:g}"] = found
    if len(lengths) >= 2:
        l1, l2 = lengths[-2], lengths[-1]
        gkd_slope = (median(l2, "gkd_onpolicy") - median(l1, "gkd_onpolicy")) / (l2 - l1)
        okd_slope = (median(l2, "okd") - median(l1, "okd")) / (l2 - l1)
        marginal = okd_slope / gkd_slope if gkd_slope > 0 else float("inf")
        summary["marginal_okd_over_gkd_onpolicy"] = marginal
        print(f"[{clock}] cost of the extra completion tokens from L = {l1} to {l2}: okd / gkd_onpolicy = "
              f"{marginal:.2f} (the ratio falls further with L while it is above this)")
        for threshold in (1.0, RATIO_TARGET):
            if measured[-1] < threshold:
                continue
            extra = extrapolated_crossover(median(l2, "okd"), median(l2, "gkd_onpolicy"), gkd_slope, marginal,
                                           threshold)
            at = None if extra is None else round(l2 + extra)
            summary[f"extrapolated_crossover_below_{threshold:g}"] = at
            text = (f"at L ~ {at}" if at is not None
                    else f"never (the line's ratio tends to {marginal:.2f}, the ratio of the slopes)")
            print(f"[{clock}] EXTRAPOLATION (both step times extended as straight lines through L = {l1} and {l2}): "
                  f"okd / gkd_onpolicy < {threshold:g} {text}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report_all(json.loads(Path(args.report).read_text()))
        return
    torch.set_num_threads(args.threads)
    if args.completion_lengths is not None:
        run_sweep(args)
        return
    tokenizer = make_tokenizer()
    train, _ = make_splits(seed=0)
    dataset = sft_dataset(train, format="messages")
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            trainer = build(variant, args, tokenizer, dataset, str(Path(tmp) / variant))
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            timed = timer.times[args.warmup:]
            medians[variant] = statistics.median(timed)
            print(f"{variant:14s} median step {1000 * medians[variant]:8.1f} ms  "
                  f"(min {1000 * min(timed):.1f}, max {1000 * max(timed):.1f}, {len(timed)} steps)", flush=True)

    print(f"\nbatch {args.batch_size}, device {args.device}, {torch.get_num_threads()} threads")
    print("| variant | median step (ms) | relative to okd |\n|---|---|---|")
    for variant, seconds in medians.items():
        relative = seconds / medians["okd"] if "okd" in medians else float("nan")
        print(f"| {variant} | {1000 * seconds:.1f} | {relative:.2f} |")
    summary = {"config": vars(args), "median_step_seconds": medians}
    if "okd" in medians and "gkd_onpolicy" in medians:
        ratio = medians["okd"] / medians["gkd_onpolicy"]
        summary["okd_over_gkd_onpolicy"] = ratio
        verdict = "PASS" if ratio <= RATIO_TARGET else "FAIL"
        print(f"\nokd / gkd_onpolicy = {ratio:.2f} (target <= {RATIO_TARGET}): {verdict}")
    if "okd" in medians and "kd_frozen" in medians:
        summary["okd_over_kd_frozen"] = medians["okd"] / medians["kd_frozen"]
        print(f"okd / kd_frozen = {summary['okd_over_kd_frozen']:.2f} (paper: about 1.6-2.5)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
