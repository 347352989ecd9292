"""Pieces shared by the benchmark scripts: a large word-level tokenizer, trainer settings for CPU/GPU runs,
completion-token counting, peak memory (CPU RSS or CUDA) and fresh-process
workers.

The scripts in ``benchmarks/`` import this as a sibling module (``from _common import ...``): Python puts a script's
own directory on ``sys.path``, and the tests add ``benchmarks/`` themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from _rss import reset_peak_rss, rss_bytes


def offline_env() -> None:
    """Environment every benchmark sets before importing transformers/TRL (no Hub, quiet tokenizers and TRL)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


offline_env()


# ---------------------------------------------------------------------------------------------------------------
# Data: a word-level tokenizer with exactly V entries (so heads have V columns and the losses use all of them)
# ---------------------------------------------------------------------------------------------------------------

WORD_SPECIALS = ("<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>")


def make_word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries (5 special tokens, then words ``w0``, ``w1``, ...)
    and a one-line chat template whose assistant turn ends with ``<|end|>`` (the EOS): the HMM task's tokenizer
    (`trl_distill.hmm_task.make_tokenizer`) sized to the vocabulary a benchmark needs."""
    from trl_distill import hmm_task

    assert WORD_SPECIALS == hmm_task.SPECIAL_TOKENS
    tokenizer = hmm_task.make_tokenizer(vocab_size - len(WORD_SPECIALS))
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def random_words(rng, vocab_size: int, n: int) -> str:
    """``n`` random words of `make_word_tokenizer(vocab_size)`'s vocabulary, space separated."""
    n_words = vocab_size - len(WORD_SPECIALS)
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))


# ---------------------------------------------------------------------------------------------------------------
# Trainer settings
# ---------------------------------------------------------------------------------------------------------------


def trainer_args(output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int, device: str = "cpu",
                 **overrides) -> dict:
    """`TrainingArguments` fields every benchmark run shares: fp32, no gradient checkpointing, no saving, no tqdm,
    no reporting, no dataloader workers (TRL's GPU defaults overridden), on `device` (``cpu`` forces the CPU)."""
    args = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
    )
    args.update(overrides)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a phase of this process, over a baseline taken by `start()`.

    CPU: the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS
    at `start()`. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at `start()`. `pause()` /
    `resume()` leave a stretch out (e.g. evaluation): the peak before the pause is kept, the mark is reset after it.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")
        self.baseline = 0
        self.peak = 0

    def _now(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        return rss_bytes("VmRSS")

    def _mark(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated()
        return rss_bytes("VmHWM")

    def _reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def start(self) -> None:
        self._reset()
        self.baseline = self._now()
        self.peak = self.baseline

    def pause(self) -> None:
        self.peak = max(self.peak, self._mark())

    def resume(self) -> None:
        self._reset()

    def stop(self) -> int:
        """Bytes above the baseline at the highest point seen (pauses excluded)."""
        self.pause()
        return self.peak - self.baseline


def non_padding_tokens(inputs) -> int:
    """Non-padding tokens of a training batch: ``attention_mask`` entries that are 1, or, for TRL's generating
    trainers (GRPO-style batches, e.g. `DistillationTrainer`), those of ``prompt_mask`` and ``completion_mask``."""
    if "attention_mask" in inputs:
        return int((inputs["attention_mask"] != 0).sum())
    return sum(int((inputs[key] != 0).sum()) for key in ("prompt_mask", "completion_mask"))


def counting(base: type, counts: list, count: Callable = non_padding_tokens) -> type:
    """`base` (a Trainer class) whose `compute_loss` appends ``(global_step, count(inputs))`` to `counts` for every
    training micro-batch (not for evaluation). `compute_loss` gets the batch the loss is computed on, so GKD-style
    on-policy batches are counted as generated."""

    class Counting(base):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            if model.training:
                counts.append((self.state.global_step, count(inputs)))
            return super().compute_loss(model, inputs, *rest, **kwargs)

    Counting.__name__ = Counting.__qualname__ = f"Counting{base.__name__}"
    return Counting


# ---------------------------------------------------------------------------------------------------------------
# Fresh-process workers
# ---------------------------------------------------------------------------------------------------------------


def launch_worker(script: str, argv: Sequence[str], worker: str, env: dict | None = None) -> dict:
    """Run ``python <script> <argv> --worker <worker>`` in a fresh process; its last stdout line is a JSON result.

    A fresh process per measurement keeps one run's freed-but-retained heap out of the next one's peak RSS.
    """
    command = [sys.executable, os.path.abspath(script), *argv, "--worker", worker]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"worker {worker} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(n: float) -> float:
    return n / 2**20
