"""What the trainers need to know about any causal LM, student or teacher: its name in messages, the transformers
model inside PEFT and distributed wrappers, its output head and rows, its backbone's hidden states (for the chunked
losses, which multiply the last hidden state by the head a few rows at a time instead of materialising ``[B, T, V]``
logits), and switching its adapter off or it into eval mode for a block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

__all__ = [
    "adapter_disabled",
    "backbone_hidden_states",
    "causal_lm",
    "check_plain_logits",
    "eval_mode",
    "head_rows",
    "model_name",
    "output_head",
    "trainable_parameters",
]


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def causal_lm(model: torch.nn.Module, *, allow_prompt_learning: bool = False) -> torch.nn.Module:
    """The transformers causal LM inside `model`: itself, or the one a PeftModel wraps (LoRA-style adapters are
    injected into its layers in place, so running it still applies them), looking through distributed wrappers.

    A wrapper (DDP, DeepSpeed's engine: TRL's `prepare_deepspeed` returns one for a teacher or reference) keeps the
    model in `.module`, and its own attributes are not the model's (a DeepSpeed engine's `config` is the DeepSpeed
    dict). ZeRO-3 gathers sharded weights through hooks on the submodules, so running the inner modules still
    gathers them.

    A prompt-learning adapter acts in `PeftModel.forward` (virtual tokens), which the inner model never sees: it
    raises, unless `allow_prompt_learning` (for callers that only hook the inner model while the wrapper runs)."""
    model = extract_model_from_parallel(model)
    if not _is_peft(model):
        return model
    if model.active_peft_config.is_prompt_learning and not allow_prompt_learning:
        # Prompt-learning adapters act in PeftModel.forward (virtual tokens), which the inner model never sees.
        raise NotImplementedError(
            f"{model_name(model)}: prompt-learning adapters ({model.active_peft_config.peft_type}) are not "
            "supported here; use an adapter injected into the layers, such as LoRA."
        )
    return model.get_base_model()


@contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the frozen base model: the adapter is off inside the block (PeftModel or transformers' own adapter
    integration); a no-op for a model without adapters."""
    if _is_peft(model):
        with model.disable_adapter():
            yield
    elif getattr(model, "_hf_peft_config_loaded", False):  # adapters added with transformers' `load_adapter`
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
    else:
        yield


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block (no dropout: measurements and greedy decoding are deterministic),
    back in the mode it was in afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should update (those with ``requires_grad``), in module order."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def model_name(model: Any) -> str:
    """A readable name for messages: a path/id as given, else the model's ``name_or_path``, else its class."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    name = getattr(model, "name_or_path", None)
    if not name:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None)
    if name:
        return str(name)
    try:
        return type(causal_lm(model)).__name__
    except NotImplementedError:
        return type(model).__name__


def head_rows(model: torch.nn.Module) -> int:
    """Rows of the output head of `model` (its vocabulary size as the losses see it), through any wrapper."""
    head = causal_lm(model).get_output_embeddings()
    if head is not None:
        rows = getattr(head, "out_features", None)  # also right for 4-bit heads, whose weight is packed
        return int(rows if rows is not None else head.weight.shape[0])
    config = causal_lm(model).config
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is None:
        raise ValueError(f"{model_name(model)!r} has neither an output head nor a `vocab_size` in its config.")
    return int(vocab_size)


# Config fields through which some architectures transform logits after the head (Gemma 2 soft-capping, Cohere
# and Granite scaling): for them hidden @ head.T is not the logits, and the chunked path would be silently wrong.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_plain_logits(model: torch.nn.Module) -> None:
    config = model.config.get_text_config()
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            raise NotImplementedError(
                f"{model_name(model)!r} transforms its logits after the output head ({field}={value}), so the "
                "hidden-state (chunked) loss path does not apply; use the dense path (loss_chunk_size=None)."
            )


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head (``get_output_embeddings()``) of a causal LM, looking through a PEFT wrapper.

    Its ``weight`` (and ``bias``) map :func:`backbone_hidden_states` to the logits. A head carrying an unmerged
    LoRA, or quantized, has no such plain weight and raises.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"{model_name(model)!r} has no output head (get_output_embeddings() is None).")
    if hasattr(head, "base_layer") and not getattr(head, "merged", False):
        # A LoRA on the head keeps its delta out of `.weight`; using it would silently drop the adapter.
        raise NotImplementedError(
            f"{model_name(model)!r} has an adapter on its output head; the hidden-state path needs a plain head "
            "(leave the head out of target_modules, or merge the adapter)."
        )
    if not head.weight.is_floating_point():
        raise TypeError(f"{model_name(model)!r} has a quantized output head; keep the head unquantized.")
    return head


def backbone_hidden_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states ``[B, T, H]`` (after the final norm), from the backbone alone: never the full logits.

    ``hidden @ output_head(model).weight.T (+ bias)`` equals ``model(...).logits``. For a PeftModel the wrapped
    model's backbone is run; its LoRA layers live inside it, so the adapter applies, and :func:`adapter_disabled`
    switches it off as usual. No KV cache is built.
    """
    lm = causal_lm(model)
    check_plain_logits(lm)
    backbone = lm.base_model  # transformers: the module under `base_model_prefix` (e.g. LlamaModel)
    if backbone is lm:
        raise TypeError(f"{model_name(model)!r} has no separate backbone (base_model_prefix) to run.")
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    return outputs.last_hidden_state
