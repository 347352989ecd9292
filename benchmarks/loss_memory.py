"""Peak memory and forward+backward time: our chunked JSD vs TRL's dense GKD loss, on the same inputs.

    python benchmarks/loss_memory.py                      # V=32000, 4096 rows, hidden 512, fp32, CPU
    python benchmarks/loss_memory.py --device cuda        # peaks from torch.cuda.max_memory_allocated
    python benchmarks/loss_memory.py --chunk-size 256 512 1024   # one chunked run per chunk size

What each variant does (student and teacher: final hidden states [rows, hidden] and an output head [V, hidden]):

* ``trl_dense``: ``student_logits = h_s @ W_s.T``, ``teacher_logits = h_t @ W_t.T`` (no grad), then TRL's
  ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta)`` and backward.
* ``chunked``: ``trl_distill.losses.chunked_divergence("jsd", h_s, W_s, h_t, W_t, mask=labels != -100, beta=...)``
  and backward.

Both backpropagate to the student hidden states and the student head weight (both require grad).

How memory is measured (CPU): each variant runs in its own fresh Python process, so nothing one variant allocated or
cached can hide or inflate the other's peak. In that process the inputs are built, a small warm-up call loads the
kernels and thread pools, then the kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``, Linux) and
the resident set size is read as the baseline. After one forward+backward, the peak mark ``VmHWM`` minus that baseline
is the variant's peak extra memory: everything the loss, its temporaries and the gradients kept resident at the worst
moment, as the operating system saw it (allocator caching included, which is what a machine actually has to provide).
On CUDA the same is done with ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` minus the
allocated baseline.

How time is measured: one more fresh process builds the inputs once and runs the variants' forward+backward in turn,
``--repeats`` rounds (after a small warm-up), so a change in machine load during the run hits every variant alike;
each variant's time is the median of its rounds.

The parent process then compares the two variants' losses and gradients (saved by the workers) and prints a table,
the ratios ours/TRL against the targets (memory <= 1/8, time <= 1.0x) and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _rss import reset_peak_rss, rss_bytes  # benchmarks/ is on sys.path when a script here runs


MEMORY_TARGET = 1 / 8  # ours / TRL peak extra memory
TIME_TARGET = 1.0  # ours / TRL forward+backward time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=4096, help="B*T positions (all counted)")
    parser.add_argument("--hidden-size", type=int, default=512, help="student and teacher hidden size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[256], help="one chunked run per value")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "memory:<variant>" or "timing"
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Worker: one variant in a fresh process
# ---------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak extra memory of a block over the memory in use at its start (CPU: RSS high-water mark; CUDA: allocator)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.baseline = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.baseline
        else:
            self.peak = rss_bytes("VmHWM") - self.baseline


def make_inputs(args, rows: int, device: torch.device, dtype: torch.dtype):
    """Deterministic student/teacher hidden states and heads, scaled so logits have a realistic spread (std ~2)."""
    generator = torch.Generator().manual_seed(args.seed)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    head_scale = 2.0 / args.hidden_size**0.5
    student_hidden = normal(rows, args.hidden_size).requires_grad_()
    student_weight = normal(args.vocab_size, args.hidden_size, scale=head_scale).requires_grad_()
    teacher_hidden = normal(rows, args.hidden_size)
    teacher_weight = normal(args.vocab_size, args.hidden_size, scale=head_scale)
    labels = torch.randint(0, args.vocab_size, (rows,), generator=generator).to(device)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def make_step(variant: str, args, inputs):
    """A closure running one forward+backward of `variant` and returning the (detached) loss."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    if variant == "trl_dense":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        def step():
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=args.beta)
            loss.backward()
            return loss.detach()

        return step

    from trl_distill.losses import chunked_divergence

    chunk_size = int(variant.split(":")[1])

    def step():
        loss = chunked_divergence("jsd", student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  mask=labels != -100, beta=args.beta, chunk_size=chunk_size)
        loss.backward()
        return loss.detach()

    return step


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args) -> None:
    """`memory:<variant>`: peak extra memory of one forward+backward (and its loss and gradients, saved to
    --output) in this fresh process. `timing`: every variant's forward+backward, alternated --repeats times in this
    one process, so a change in machine load hits all variants alike."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    variants = [args.worker.split(":", 1)[1]] if args.worker.startswith("memory:") else _variants(args)

    # Warm-up on a few rows: loads libraries, kernels and thread pools outside the measured window.
    warm_inputs = make_inputs(args, 16, device, dtype)
    for variant in variants:
        make_step(variant, args, warm_inputs)()
    del warm_inputs

    inputs = make_inputs(args, args.rows, device, dtype)
    student_hidden, student_weight = inputs[0], inputs[1]
    steps = {variant: make_step(variant, args, inputs) for variant in variants}
    _synchronize(device)
    if args.worker.startswith("memory:"):
        with PeakMemory(device) as memory:
            loss = steps[variants[0]]()
        torch.save({"loss": loss.float().cpu(), "grad_hidden": student_hidden.grad.float().cpu(),
                    "grad_weight": student_weight.grad.float().cpu()}, args.output)
        print(json.dumps({"peak_bytes": memory.peak, "loss": loss.item()}))
        return

    times = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for variant, step in steps.items():
            student_hidden.grad = student_weight.grad = None
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[variant].append(time.perf_counter() - start)
    print(json.dumps(times))


def _variants(args) -> list[str]:
    return ["trl_dense"] + [f"chunked:{size}" for size in args.chunk_size]


# ---------------------------------------------------------------------------------------------------------------
# Parent: both variants, comparison, table
# ---------------------------------------------------------------------------------------------------------------


def _launch(worker: str, argv: list[str], output: str = "") -> dict:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", worker, "--output", output]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{worker} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _max_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
          f"V={args.vocab_size}, rows={args.rows}, hidden={args.hidden_size}, {args.dtype}, beta={args.beta}, "
          f"repeats={args.repeats}", flush=True)
    # Timings on a shared machine depend on what else runs: report the load around the run.
    load_before = os.getloadavg()[0]
    variants = _variants(args)
    memory, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:  # each in a fresh process
            output = os.path.join(tmp, variant.replace(":", "_") + ".pt")
            memory[variant] = _launch(f"memory:{variant}", argv, output)
            tensors[variant] = torch.load(output)
    times = _launch("timing", argv)  # all variants, alternated, in one process
    median = {variant: statistics.median(times[variant]) for variant in variants}
    print(f"1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} CPUs)")

    print()
    print(f"{'variant':<22}{'peak extra MiB':>16}{'median time s':>15}{'all times s':>24}{'loss':>12}")
    for variant in variants:
        name = "TRL dense (GKD)" if variant == "trl_dense" else f"ours chunked {variant.split(':')[1]}"
        all_times = " ".join(f"{t:.2f}" for t in times[variant])
        print(f"{name:<22}{memory[variant]['peak_bytes'] / 2**20:>16.1f}{median[variant]:>15.3f}{all_times:>24}"
              f"{memory[variant]['loss']:>12.6f}")
    print()

    all_pass = True
    for variant in variants[1:]:
        memory_ratio = memory[variant]["peak_bytes"] / memory["trl_dense"]["peak_bytes"]
        time_ratio = median[variant] / median["trl_dense"]
        ours, theirs = tensors[variant], tensors["trl_dense"]
        loss_diff = _max_relative_difference(ours["loss"], theirs["loss"])
        hidden_diff = _max_relative_difference(ours["grad_hidden"], theirs["grad_hidden"])
        weight_diff = _max_relative_difference(ours["grad_weight"], theirs["grad_weight"])
        agree = max(loss_diff, hidden_diff, weight_diff) < 1e-4
        memory_ok, time_ok = memory_ratio <= MEMORY_TARGET, time_ratio <= TIME_TARGET
        all_pass &= memory_ok and time_ok and agree
        print(f"chunk {variant.split(':')[1]}: memory ours/TRL {memory_ratio:.3f} (target <= {MEMORY_TARGET:.3f}) "
              f"{'PASS' if memory_ok else 'FAIL'} | time ours/TRL {time_ratio:.3f} (target <= {TIME_TARGET:.1f}) "
              f"{'PASS' if time_ok else 'FAIL'}")
        print(f"  agreement with TRL (max relative difference): loss {loss_diff:.2e}, grad hidden "
              f"{hidden_diff:.2e}, grad weight {weight_diff:.2e} (< 1e-4) {'PASS' if agree else 'FAIL'}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
