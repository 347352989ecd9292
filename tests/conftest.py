"""Shared fixtures: tiny offline models on the shipped addition task, CPU-friendly trainer settings."""

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
