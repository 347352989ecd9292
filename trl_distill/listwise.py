"""Listwise preference data (ADPO): tokenization of `prompt` + `completions` rows, reward scoring in TRL's GRPO reward
convention, the collator, and the dataset preparation `ADPOTrainer._prepare_dataset` delegates to."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import common_prefix_length, is_conversational
from trl.trainer.utils import global_then_local_main_first, pad

from ._compat import tokenize

__all__ = ["DataCollatorForListwisePreference", "pad_token_id", "prepare_listwise_dataset", "score_completions",
           "tokenize_listwise"]


def tokenize_listwise(batch: dict[str, list], processing_class, reward_funcs, reward_weights, eos_token) -> dict:
    """Tokenize listwise rows (batched `map`) and, when `reward_funcs` are given, score their completions.

    Each completion is tokenized together with its prompt; the completion starts where every prompt+completion
    stops sharing a prefix with the tokenized prompt (TRL's rule for pairs, see `common_prefix_length`).
    """
    prompt_ids_out, completion_ids_out = [], []
    for index, prompt in enumerate(batch["prompt"]):
        completions = batch["completions"][index]
        if not completions:
            raise ValueError("A listwise row has an empty `completions` list.")
        template_kwargs = dict((batch.get("chat_template_kwargs") or [{}] * len(batch["prompt"]))[index] or {})
        tools = (batch.get("tools") or [None] * len(batch["prompt"]))[index]
        if tools is not None:
            template_kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        if is_conversational({"prompt": prompt}):
            prompt_ids = tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"]
            full_ids = [tokenize(processing_class, prompt + c, **template_kwargs)["input_ids"] for c in completions]
        else:
            # As TRL does for pairs: plain-text completions end with EOS so the policy learns to stop.
            completions = [c if c.endswith(eos_token) else c + eos_token for c in completions]
            prompt_ids = tokenize(processing_class, prompt)["input_ids"]
            full_ids = [tokenize(processing_class, prompt + c)["input_ids"] for c in completions]
        prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
        prompt_ids_out.append(prompt_ids[:prompt_len])
        completion_ids_out.append([ids[prompt_len:] for ids in full_ids])
    output = {"prompt_ids": prompt_ids_out, "completion_ids": completion_ids_out}
    if reward_funcs:
        output["rewards"] = score_completions(batch, completion_ids_out, reward_funcs, reward_weights)
    return output


def score_completions(batch, completion_ids, reward_funcs, reward_weights) -> list[list[float]]:
    """Rewards of every completion, in TRL's GRPO reward convention.

    Each function receives one flat list per argument (`prompts`, `completions`, `completion_ids`, and every other
    column repeated once per completion) and returns one float (or `None`) per completion. As GRPO, `None` counts as
    NaN and the weighted sum over functions ignores NaNs.
    """
    counts = [len(c) for c in batch["completions"]]
    repeat = lambda column: [value for value, k in zip(column, counts, strict=True) for _ in range(k)]  # noqa: E731
    kwargs = {key: repeat(values) for key, values in batch.items() if key not in ("prompt", "completions", "rewards")}
    prompts = repeat(batch["prompt"])
    completions = [c for row in batch["completions"] for c in row]
    flat_ids = [ids for row in completion_ids for ids in row]
    per_func = []
    for func in reward_funcs:
        scores = func(prompts=prompts, completions=completions, completion_ids=flat_ids, **kwargs)
        if len(scores) != len(completions):
            name = getattr(func, "__name__", type(func).__name__)
            raise ValueError(f"Reward function {name!r} returned {len(scores)} rewards for {len(completions)} completions.")
        per_func.append(torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32))
    weights = torch.tensor(reward_weights, dtype=torch.float32)
    rewards = (torch.stack(per_func, dim=1) * weights).nansum(dim=1).tolist()
    out, start = [], 0
    for k in counts:
        out.append(rewards[start : start + k])
        start += k
    return out


@dataclass
class DataCollatorForListwisePreference(DataCollatorMixin):
    """
    Batches listwise preference rows (and TRL's tokenized pairs) for [`ADPOTrainer`].

    Each row holds `prompt_ids` and either `completion_ids` (a list of K token lists, K may differ between rows) with
    `rewards` (K floats), or TRL's `chosen_ids`/`rejected_ids` (a pair, K = 2, hard target). The K completions of
    every row are flattened, row after row, into one right-padded batch of `prompt + completion` sequences:

    - `input_ids`, `attention_mask`, `completion_mask`: `[N, L]` with `N = sum K` (padding is masked out of both);
    - `completion_counts`: `[B]`, K of each row, which maps sequences back to their prompt;
    - `rewards`: `[N]` (1 for chosen, 0 for rejected on pairs);
    - `hard_target`: `[B]` bool, rows whose target is one-hot on the best completion (pairs).

    Args:
        pad_token_id (`int`): token id used for padding.
        max_length (`int` or `None`, defaults to `None`): truncate every sequence to this many tokens.
        truncation_mode (`str`, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"`, as TRL's collator.
        pad_to_multiple_of (`int` or `None`, defaults to `None`): pad the length to a multiple of this value.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, masks, rewards, counts, hard = [], [], [], [], []
        for example in examples:
            if "completion_ids" in example:
                completions, row_rewards = example["completion_ids"], example["rewards"]
                if len(row_rewards) != len(completions):
                    raise ValueError(f"A row has {len(completions)} completions but {len(row_rewards)} rewards.")
                hard.append(False)
            else:
                completions, row_rewards = [example["chosen_ids"], example["rejected_ids"]], [1.0, 0.0]
                hard.append(True)
            prompt = list(example["prompt_ids"])
            for completion in completions:
                sequences.append(prompt + list(completion))
                masks.append([0] * len(prompt) + [1] * len(completion))
            rewards.extend(float(r) for r in row_rewards)
            counts.append(len(completions))
        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                window = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                window = slice(-self.max_length, None)
            else:
                raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
            sequences, masks = [s[window] for s in sequences], [m[window] for m in masks]
        as_tensors = lambda rows: [torch.tensor(r, dtype=torch.long) for r in rows]  # noqa: E731
        return {
            "input_ids": pad(as_tensors(sequences), padding_value=self.pad_token_id, padding_side="right",
                             pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad(as_tensors([[1] * len(s) for s in sequences]), padding_value=0,
                                  padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad(as_tensors(masks), padding_value=0, padding_side="right",
                                   pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_counts": torch.tensor(counts, dtype=torch.long),
            "rewards": torch.tensor(rewards, dtype=torch.float32),
            "hard_target": torch.tensor(hard, dtype=torch.bool),
        }


def prepare_listwise_dataset(
    dataset, processing_class, args, dataset_name: str, reward_funcs, reward_weights, eos_token: str
):
    """Tokenize (and, with `reward_funcs`, score) a listwise dataset for ADPO: `prompt` + `completions` (+ `rewards`)
    rows become `prompt_ids` + `completion_ids` (+ `rewards`); already tokenized rows are returned as they are.
    Rows whose prompt fills `args.max_length` are dropped (with `truncation_mode="keep_start"`), as TRL does."""
    first = next(iter(dataset))
    if "prompt_ids" in first:  # already tokenized
        return dataset
    if "prompt" not in first:
        raise ValueError("Listwise data needs a `prompt` column beside `completions`.")
    if reward_funcs and "rewards" in first:
        raise ValueError(
            "The dataset has a `rewards` column and `reward_funcs` were given: drop one of them, so it is clear "
            "which rewards ADPO's target uses."
        )
    if not reward_funcs and "rewards" not in first:
        raise ValueError("Listwise data needs a `rewards` column (a list per prompt), or pass `reward_funcs`.")

    map_kwargs: dict[str, Any] = {"batched": True}
    if isinstance(dataset, Dataset):  # IterableDataset.map takes neither num_proc nor desc
        map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Tokenizing listwise {dataset_name} dataset")
    with global_then_local_main_first():
        dataset = dataset.map(
            tokenize_listwise,
            fn_kwargs={
                "processing_class": processing_class,
                "reward_funcs": reward_funcs,
                "reward_weights": reward_weights,
                "eos_token": eos_token,
            },
            **map_kwargs,
        )
        if args.max_length is not None and args.truncation_mode == "keep_start":
            # As TRL: a prompt that fills max_length would leave no completion token to learn from.
            filter_kwargs = {k: v for k, v in map_kwargs.items() if k != "batched"}
            if "desc" in filter_kwargs:
                filter_kwargs["desc"] = f"Dropping fully truncated examples from {dataset_name} dataset"
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length, **filter_kwargs)
    return dataset


def pad_token_id(processing_class) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        raise ValueError("ADPOTrainer needs `processing_class` (the policy's tokenizer).")
    if tokenizer.pad_token is None:  # as DPOTrainer: fall back to EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id
