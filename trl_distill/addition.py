"""The shipped task: two-digit addition with the answer's digits written in reverse (SPEC section 9).

Reversed answers ("carry order": 47+85=132 is written ``231``) let a tiny left-to-right model emit each digit after
the digits it depends on, so a 4-layer, 128-wide model solves it after 1,500 steps of `trl_distill.testing.train_sft`
(a few CPU minutes) and students trained in different ways can be compared by exact match on greedy decoding.

Everything here is built offline: a character-level tokenizer with a chat template, fixed train/eval splits, and
`datasets.Dataset` builders in TRL's formats (SFT, GKD, DPO, listwise preference), a checker in TRL's GRPO reward
convention and a batched greedy evaluator.

Padding: the tokenizer pads on the right, as training collators expect. Generation needs left padding, so that every
prompt ends at the last column; `generate_completions` asks for it per call (``padding_side="left"``) and never
mutates the tokenizer.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from datasets import Dataset
from tokenizers import Regex, decoders, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .models import eval_mode
from .task_tokenizer import word_level_tokenizer

PAD, UNK, SYSTEM, USER, ASSISTANT, END = "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, SYSTEM, USER, ASSISTANT, END)
# Digits and the two operators are all the task needs; the space lets hand-typed prompts ("12 + 34 =") tokenize.
# Anything else (TRL probes templates with words like "dummy", system prompts may hold prose) becomes <unk>.
CHARACTERS = "0123456789+= "

# One line, with whitespace control everywhere, so the template emits no stray newlines between turns. The
# assistant's content *and* its <|end|> sit inside {% generation %}: TRL's `assistant_only_loss` then trains the
# model to stop (TRL checks this with `is_chat_template_stop_token_trained`). List-of-parts content (VLM style) is
# flattened to its text parts so TRL's multimodal probes do not fail.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM + "{{ content }}"
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ content }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{% generation %}{{ content }}" + END
    + "{% endgeneration %}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)

SftFormat = Literal["messages", "prompt_completion", "language_modeling"]


def make_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Character-level tokenizer of the task, built with the `tokenizers` library (no download).

    Special tokens are single ids and registered as added tokens (TRL looks the end-of-turn token up there); there
    is no BOS, so nothing is prepended on encoding. The `Fuse` decoder joins characters without spaces. Pads on the
    right (training); pass ``padding_side="left"`` when batching prompts for generation.
    """
    every_character = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # each one is a token
    return word_level_tokenizer(SPECIAL_TOKENS, CHARACTERS, every_character, CHAT_TEMPLATE, pad=PAD, unk=UNK, end=END,
                                model_max_length=model_max_length, decoder=decoders.Fuse())


def answer(a: int, b: int) -> str:
    """The target: digits of ``a + b`` least significant first, e.g. ``answer(47, 85) == "231"``."""
    return str(a + b)[::-1]


def prompt_text(a: int, b: int) -> str:
    """The user turn of a problem, e.g. ``"47+85="``."""
    return f"{a}+{b}="


def make_problems(n: int, seed: int, digits: int = 2) -> list[tuple[int, int]]:
    """``n`` distinct ordered pairs of ``digits``-digit operands, deterministic by ``seed``.

    Pairs are drawn one by one, skipping repeats, so the first ``m`` problems for a seed are the same whatever ``n``
    (`make_splits` relies on it to keep the eval set fixed when the train set grows).
    """
    low, high = (0, 10) if digits == 1 else (10 ** (digits - 1), 10**digits)
    if not 0 <= n <= (high - low) ** 2:
        raise ValueError(f"n={n} must be between 0 and the {(high - low) ** 2} distinct {digits}-digit pairs")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems: list[tuple[int, int]] = []
    while len(problems) < n:
        pair = (rng.randrange(low, high), rng.randrange(low, high))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def make_splits(
    seed: int = 0, n_train: int = 4000, n_eval: int = 500, digits: int = 2
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint ``(train, eval)`` problem lists; eval depends only on ``(seed, n_eval)``, not on ``n_train``."""
    problems = make_problems(n_eval + n_train, seed, digits)
    return problems[n_eval:], problems[:n_eval]


def _user(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt_text(a, b)}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@functools.lru_cache(maxsize=1)
def _renderer() -> PreTrainedTokenizerFast:
    """A private tokenizer used only to render text, so callers' tokenizers are never touched."""
    return make_tokenizer()


def sft_dataset(problems: Sequence[tuple[int, int]], format: SftFormat = "messages") -> Dataset:
    """Supervised data in one of TRL's formats, each row with an ``answer`` column (for rewards and checks).

    - ``"messages"``: conversational language modeling (SFTTrainer, GKD's `DataCollatorForChatML`);
    - ``"prompt_completion"``: conversational prompt/completion (SFTTrainer trains on the completion only);
    - ``"language_modeling"``: a ``text`` column holding the chat-template rendering, so a model trained on it is
      evaluated by `exact_match` in the same format.
    """
    rows: list[dict[str, Any]] = []
    for a, b in problems:
        target = answer(a, b)
        messages = _user(a, b) + _assistant(target)
        if format == "messages":
            rows.append({"messages": messages, "answer": target})
        elif format == "prompt_completion":
            rows.append({"prompt": _user(a, b), "completion": _assistant(target), "answer": target})
        elif format == "language_modeling":
            rows.append({"text": _renderer().apply_chat_template(messages, tokenize=False), "answer": target})
        else:
            raise ValueError(f"format must be 'messages', 'prompt_completion' or 'language_modeling', got {format!r}")
    return Dataset.from_list(rows)


def _no_carry(a: int, b: int) -> str:
    """Digit-wise sum modulo 10, least significant first: the answer of someone who forgets every carry."""
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    da, db = da.ljust(width, "0"), db.ljust(width, "0")
    return "".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))


def _digit_off(target: str) -> list[str]:
    """Every answer with one digit one higher or one lower (mod 10)."""
    out = []
    for i, digit in enumerate(target):
        for delta in (1, 9):
            out.append(target[:i] + str((int(digit) + delta) % 10) + target[i + 1 :])
    return out


def wrong_answers(a: int, b: int) -> dict[str, list[str]]:
    """Plausible mistakes for ``a+b``, by kind, each list free of the correct answer and of repeats across kinds."""
    target = answer(a, b)
    kinds = {
        "no_carry": [_no_carry(a, b)],
        "not_reversed": [str(a + b)],
        "dropped_carry": [target[:-1]] if len(target) > max(len(str(a)), len(str(b))) else [],
        "digit_off": _digit_off(target),
    }
    seen = {target}
    out: dict[str, list[str]] = {}
    for kind, candidates in kinds.items():
        kept = [c for c in dict.fromkeys(candidates) if c and c not in seen]
        seen.update(kept)
        if kept:
            out[kind] = kept
    return out


def _problem_rng(seed: int, a: int, b: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs, and each problem's draw does
    # not depend on which other problems are in the list.
    return random.Random(f"{seed}:{a}+{b}")


def preference_dataset(problems: Sequence[tuple[int, int]], seed: int = 0) -> Dataset:
    """Conversational preference data (``prompt``/``chosen``/``rejected``, plus ``answer``) for DPO-style trainers.

    ``chosen`` is correct; ``rejected`` is a plausible mistake: the kind (forgotten carry, not reversed, dropped final
    carry, one digit off) is drawn uniformly among those that differ from the answer, deterministically by seed.
    """
    rows = []
    for a, b in problems:
        rng = _problem_rng(seed, a, b)
        mistakes = wrong_answers(a, b)
        rejected = rng.choice(mistakes[rng.choice(sorted(mistakes))])
        rows.append(
            {
                "prompt": _user(a, b),
                "chosen": _assistant(answer(a, b)),
                "rejected": _assistant(rejected),
                "answer": answer(a, b),
            }
        )
    return Dataset.from_list(rows)


def listwise_dataset(problems: Sequence[tuple[int, int]], k: int = 4, seed: int = 0, n_correct: int = 1) -> Dataset:
    """Listwise data: ``prompt``, ``completions`` (k conversational completions), ``rewards`` (k floats), ``answer``.

    ``n_correct`` completions are the correct answer and the other ``k - n_correct`` are distinct plausible mistakes,
    in an order shuffled by seed; rewards come from `reward_exact_match`, so they agree with the checker.
    """
    if not 1 <= n_correct <= k:
        raise ValueError(f"n_correct={n_correct} must be between 1 and k={k}")
    rows = []
    for a, b in problems:
        rng = _problem_rng(seed, a, b)
        pool = [c for candidates in wrong_answers(a, b).values() for c in candidates]
        if len(pool) < k - n_correct:
            raise ValueError(f"only {len(pool)} distinct wrong answers for {a}+{b}; lower k")
        texts = [answer(a, b)] * n_correct + rng.sample(pool, k - n_correct)
        rng.shuffle(texts)
        completions = [_assistant(t) for t in texts]
        rows.append(
            {
                "prompt": _user(a, b),
                "completions": completions,
                "rewards": reward_exact_match(completions, [answer(a, b)] * k),
                "answer": answer(a, b),
            }
        )
    return Dataset.from_list(rows)


def parse_completion(text: str) -> str:
    """The answer in a decoded completion: the text before the first ``<|end|>``, without special tokens or spaces."""
    text = text.split(END, 1)[0]
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text.strip()


def reward_exact_match(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where a completion's parsed answer equals the ``answer`` column, else 0.0 (TRL's GRPO reward convention).

    Completions are plain strings or conversational (a list of messages, the last one the assistant's). Other
    dataset columns and trainer extras arrive as keyword arguments and are ignored. Lenient about the end token,
    because TRL's trainers decode completions with ``skip_special_tokens=True``; `exact_match` is the strict check.
    """
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        rewards.append(1.0 if parse_completion(text) == str(target) else 0.0)
    return rewards


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[tuple[int, int]],
    batch_size: int = 256,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy completions of ``model`` (plain or PEFT) to ``problems``, decoded with special tokens kept.

    Prompts go through the tokenizer's chat template with the generation prompt and are padded on the left; the
    model is put in eval mode and its previous mode restored afterwards. Use `parse_completion` for the answer.
    """
    device = next(model.parameters()).device
    vocab_size = len(tokenizer)
    texts: list[str] = []
    with eval_mode(model):
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            conversations = [_user(a, b) for a, b in batch]
            prompts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(
                prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            # A head padded beyond the tokenizer can emit ids the tokenizer cannot decode: count them as <unk>.
            new_tokens = new_tokens.masked_fill(new_tokens >= vocab_size, tokenizer.unk_token_id)
            texts.extend(tokenizer.batch_decode(new_tokens))
    return texts


def is_exact(completion: str, target: str) -> bool:
    """Strict check used by `exact_match`: the completion is the target followed by ``<|end|>`` (it must stop)."""
    return completion.startswith(target + END)


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[tuple[int, int]],
    batch_size: int = 256,
    max_new_tokens: int = 4,
) -> float:
    """Fraction of ``problems`` whose greedy completion is exactly `answer` then ``<|end|>`` (see `is_exact`).

    ``max_new_tokens=4`` fits a three-digit sum and its end token, the longest correct completion of the task.
    """
    if not problems:
        raise ValueError("exact_match needs at least one problem")
    completions = generate_completions(model, tokenizer, problems, batch_size, max_new_tokens)
    return sum(is_exact(c, answer(a, b)) for c, (a, b) in zip(completions, problems)) / len(problems)
