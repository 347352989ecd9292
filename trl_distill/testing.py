"""Tiny offline models for tests, examples and benchmarks on the shipped addition task (`trl_distill.addition`).

`tiny_causal_lm` builds a randomly initialised Llama (so LoRA's usual `q_proj`/`v_proj` targets exist);
`tiny_teacher` and `tiny_student` are the sizes of SPEC section 9. `train_sft` is a compact plain-PyTorch loop used
only to make a competent teacher fast (the library's trainers are what it is about); `pretrained_teacher` trains one
once and caches it on disk so every test, example and benchmark shares it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import addition


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    padded_vocab: int | None = None,
    max_position_embeddings: int = 64,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama sized for CPU tests, deterministic by ``seed``.

    The vocabulary is ``len(tokenizer)``, or ``padded_vocab`` rows (at least that) when given, as real checkpoints pad
    their embeddings to a round size. Word embeddings are untied so the output head is a separate parameter.
    """
    vocab_size = len(tokenizer) if padded_vocab is None else padded_vocab
    if vocab_size < len(tokenizer):
        raise ValueError(f"padded_vocab={padded_vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Fork the RNG so that building a model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def pad_output_head(model: LlamaForCausalLM, rows: int, padding_logit: float = -30.0) -> LlamaForCausalLM:
    """Pad `model`'s vocabulary to `rows`, as real checkpoints do (Qwen2.5 pads 151,665 tokens to 151,936 rows).

    A trained checkpoint never predicts its padding rows, so they carry ~0 probability; a randomly initialised head
    would give them as much as any token. Here the output head gets a bias, 0 on the real rows and `padding_logit` on
    the new ones, so the padding carries ~exp(padding_logit) of the mass, as in a trained model. In memory only: the
    bias is not part of the Llama architecture that `save_pretrained` describes.
    """
    real = model.get_output_embeddings().weight.shape[0]
    if rows <= real:
        raise ValueError(f"rows={rows} must exceed the head's {real} rows")
    model.resize_token_embeddings(rows, mean_resizing=False)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, rows, bias=True, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[real:] = padding_logit
    model.set_output_embeddings(head)
    return model


def tiny_teacher(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """The task's teacher size: 4 layers, 128 wide (about 1.05M parameters)."""
    return tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4, num_heads=4, seed=seed)


def tiny_student(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """The task's student size: 2 layers, 48 wide (about 76k parameters)."""
    return tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=seed)


def _encode_problems(
    tokenizer: PreTrainedTokenizerFast, problems: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the completion) for all problems.

    Texts come from the tokenizer's chat template; rendering and tokenizing in batches is about five times faster
    than one `apply_chat_template(tokenize=True)` call per problem.
    """
    prompts = [[{"role": "user", "content": addition.prompt_text(a, b)}] for a, b in problems]
    full = [p + [{"role": "assistant", "content": addition.answer(a, b)}] for p, (a, b) in zip(prompts, problems)]
    prompt_texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    full_texts = tokenizer.apply_chat_template(full, tokenize=False)
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    rows = tokenizer(full_texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, prompt) in enumerate(zip(rows, prompt_ids)):
        if ids[: len(prompt)] != prompt:  # the template must render the prompt as a prefix of the conversation
            raise ValueError(f"prompt {prompt_texts[i]!r} is not a prefix of {full_texts[i]!r}")
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
    return input_ids, (input_ids != tokenizer.pad_token_id).long(), labels


def train_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[tuple[int, int]],
    steps: int,
    **training: Any,
) -> list[float]:
    """Supervised training on the addition completions (answer and ``<|end|>``) only; returns every step's loss.

    The problems are rendered with the tokenizer's chat template and trained with `train_on_tensors`, which takes
    the remaining options (``batch_size``, ``lr``, ``seed``, ``log_every``, ``warmup_steps``, ``weight_decay``).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = (t.to(device) for t in _encode_problems(tokenizer, problems))
    return train_on_tensors(model, input_ids, attention_mask, labels, steps, **training)


def train_on_tensors(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int | None = None,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
) -> list[float]:
    """Causal-LM training on ``labels`` (-100 where nothing is learned); returns the loss of every step.

    AdamW with linear warmup then cosine decay to zero, batches drawn from reshuffled epochs (deterministic by
    ``seed``), gradient norm clipped at 1. Prints progress every ``log_every`` steps (default: 5 lines in all; 0:
    silent). The model is left in the mode it came in.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    log_every = max(1, steps // 5) if log_every is None else log_every
    was_training = model.training
    model.train()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:  # new epoch: reshuffle (the short tail of the last one is dropped)
            order = torch.randperm(len(input_ids), generator=generator)
        index, order = order[:batch_size].to(device), order[batch_size:]
        loss = model(input_ids=input_ids[index], attention_mask=attention_mask[index], labels=labels[index]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            mean = sum(recent) / len(recent)
            print(f"training step {step + 1}/{steps}: loss {mean:.4f} ({time.time() - start:.0f} s)", flush=True)
    model.train(was_training)
    return losses


def teacher_cache_path(cache_dir: str | os.PathLike | None = None, steps: int = 1500, seed: int = 0) -> Path:
    """Where `pretrained_teacher` keeps a teacher: ``<root>/addition_teacher_s{seed}_{steps}``.

    ``root`` is ``cache_dir``, else ``$TRL_DISTILL_CACHE``, else ``~/.cache/trl_distill``.
    """
    return _cache_root(cache_dir) / f"addition_teacher_s{seed}_{steps}"


def pretrained_teacher(
    cache_dir: str | os.PathLike | None = None, steps: int = 1500, seed: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A `tiny_teacher` trained with `train_sft` on ``make_splits(seed)``'s train split, cached on disk; eval mode.

    A cache whose tokenizer differs from `addition.make_tokenizer` (an older task version) is retrained. The cache
    is written to a temporary directory beside the target and renamed into place, so an interrupted run never leaves
    a half-written teacher, and concurrent runs keep whichever finished first.
    """
    path = teacher_cache_path(cache_dir, steps, seed)
    tokenizer = addition.make_tokenizer()
    if (path / "config.json").exists():
        cached_tokenizer = AutoTokenizer.from_pretrained(path)
        same_vocab = cached_tokenizer.get_vocab() == tokenizer.get_vocab()
        if same_vocab and cached_tokenizer.chat_template == tokenizer.chat_template:
            return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), cached_tokenizer
        print(f"pretrained_teacher: {path} was made with another tokenizer; retraining")
        shutil.rmtree(path, ignore_errors=True)

    train_problems, _ = addition.make_splits(seed=seed)
    model = tiny_teacher(tokenizer, seed=seed)
    print(f"pretrained_teacher: training a tiny teacher for {steps} steps (cached at {path})")
    train_sft(model, tokenizer, train_problems, steps=steps, seed=seed)
    _save_atomically(model, tokenizer, path)
    return model.eval(), tokenizer


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$TRL_DISTILL_CACHE``, else ``~/.cache/trl_distill``."""
    return Path(cache_dir or os.environ.get("TRL_DISTILL_CACHE") or Path.home() / ".cache" / "trl_distill")


def hmm_teacher_cache_path(config, steps: int, cache_dir: str | os.PathLike | None = None, hidden_size: int = 128,
                           num_layers: int = 4, batch_size: int = 32) -> Path:
    """Where `pretrained_hmm_teacher` keeps a teacher: ``<root>/hmm_teacher_<task key>_{steps}``, with
    ``_{layers}x{hidden}b{batch}`` appended for any shape other than the default 4x128, batch 32."""
    shape = "" if (hidden_size, num_layers, batch_size) == (128, 4, 32) else f"_{num_layers}x{hidden_size}b{batch_size}"
    return _cache_root(cache_dir) / f"hmm_teacher_{config.key()}_{steps}{shape}"


def pretrained_hmm_teacher(
    config=None, steps: int = 2000, cache_dir: str | os.PathLike | None = None, hidden_size: int = 128,
    num_layers: int = 4, batch_size: int = 32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A ``num_layers x hidden_size`` teacher of the HMM task (`trl_distill.hmm_task`), cached on disk; eval mode.

    Trained with `train_on_tensors` on ``steps * batch_size`` fresh samples of p* from the task's own "teacher"
    stream (abundant data: every sequence is seen once), so its KL to p* is limited by its size and steps only. The
    cache key is the task's parameters, the teacher's shape and its steps; writes are atomic as in
    `pretrained_teacher`.
    """
    from . import hmm_task

    config = config or hmm_task.TaskConfig()
    tokenizer = hmm_task.make_tokenizer(config.n_words)
    path = hmm_teacher_cache_path(config, steps, cache_dir, hidden_size, num_layers, batch_size)
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer
    prompts, completions = hmm_task.sample_pairs(config, steps * batch_size, "teacher")
    input_ids, labels = hmm_task.encode_sequences(prompts, completions)
    model = tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=config.seed)
    print(f"pretrained_hmm_teacher: training a {num_layers}x{hidden_size} teacher for {steps} steps (cached at {path})",
          flush=True)
    train_on_tensors(model, input_ids, torch.ones_like(input_ids), labels, steps, batch_size=batch_size, lr=3e-3,
                     seed=config.seed, warmup_steps=max(1, steps // 20))
    _save_atomically(model, tokenizer, path)
    return model.eval(), tokenizer


def _save_atomically(model, tokenizer, path: Path) -> None:
    """Save into a temporary sibling and rename it into place (a concurrent writer's copy wins if it was first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable like any other directory
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").exists():  # not a lost race with another writer: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
