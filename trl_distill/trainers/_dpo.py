"""What the DPO-based trainers that replace TRL's loss (ADPO, REDI) share about TRL's preference batches."""

from __future__ import annotations

from typing import Any

import torch


def completion_token_logps(model, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """One policy forward of a TRL preference batch through TRL's fused LM head (no full logits are built).

    Returns `(outputs, token_logps, shift_mask, model_kwargs, labels)`: `token_logps` `[B, L-1]` are the log-probs of
    each next token (0 outside completions), `shift_mask` `[B, L-1]` marks completion tokens, and `model_kwargs` /
    `labels` are what was passed, for a second model (an anchor) to score the same tokens.
    """
    model_kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[:, 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
    token_logps = outputs.log_probs[:, -shift_mask.size(1) :]
    return outputs, token_logps, shift_mask, model_kwargs, labels
