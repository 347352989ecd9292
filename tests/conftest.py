"""Shared fixtures: tiny offline models on the shipped addition task, CPU-friendly trainer settings."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run 10x faster on one thread than on two contended ones (measured on the 2-core CI machine).
torch.set_num_threads(1)

from trl_distill import addition  # noqa: E402
from trl_distill.testing import tiny_causal_lm  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return addition.make_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    return tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1)


@pytest.fixture
def student(tokenizer):
    return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)


def assert_accumulation_equals_one_batch(student, make_trainer, trainer_class, monkeypatch):
    """A trainer's token-level terms are divided by the whole optimizer step's token count (SPEC's reduction).

    One plain-SGD optimizer step (lr 1e-2, no clipping) with 2 x 4 accumulated micro-batches changes every weight as
    one batch of 8 does. With per-micro-batch means instead (`trainer_class._count_step_tokens` switched off) it
    would not: the data tells the two apart. `make_trainer(model, name, **training_args)` builds the trainer on a
    copy of `student`; `name` is a distinct output folder name.
    """

    def step_change(name, batch, accumulation):
        model = copy.deepcopy(student)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = make_trainer(model, name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               max_steps=1, optim="sgd", learning_rate=1e-2, max_grad_norm=0.0)
        trainer.train()
        return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}

    one_batch = step_change("b8x1", 8, 1)
    accumulated = step_change("b4x2", 4, 2)
    for name, delta in one_batch.items():
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-7)

    monkeypatch.setattr(trainer_class, "_count_step_tokens", lambda self, batch_samples: None)
    per_micro_batch = step_change("per_micro_batch", 4, 2)
    largest = max((per_micro_batch[n] - one_batch[n]).abs().max().item() for n in one_batch)
    assert largest > 1e-4 * max(d.abs().max().item() for d in one_batch.values())


@pytest.fixture(scope="session")
def problems():
    train, _ = addition.make_splits(seed=0, n_train=64, n_eval=16)
    return train


def cpu_args(**overrides):
    """TrainingArguments overrides for CPU tests (never library defaults): fp32, no checkpointing, no saving."""
    args = dict(
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        max_steps=2,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args
