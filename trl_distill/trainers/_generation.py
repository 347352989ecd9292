"""On-policy sampling settings and samplers shared with TRL's `DistillationTrainer`: HF `generate` or vLLM.

`OnPolicyGenerationArguments` holds TRL 1.16 `DistillationConfig`'s generation, vLLM and completion-logging fields
under the same names and defaults; `OnPolicyGenerationMixin` builds the `GenerationConfig` the student samples with,
samples through TRL's `VLLMGeneration` when `use_vllm=True` (weights synced before the first generation of each
optimizer step, as `DistillationTrainer` does), and logs sampled completions.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import GenerationConfig

logger = logging.getLogger(__name__)

VLLM_MODES = ("colocate", "server")


@dataclass
class OnPolicyGenerationArguments:
    r"""
    Sampling fields of on-policy generation, with the names and defaults of TRL's `DistillationConfig`.

    Args:
        top_p (`float`, *optional*, defaults to `1.0`):
            Top-p (nucleus) sampling of on-policy completions.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling of on-policy completions; `0` disables top-k filtering.
        min_p (`float` or `None`, *optional*, defaults to `None`):
            Minimum token probability, scaled by the most likely token's probability (0.01-0.2 typical).
        repetition_penalty (`float`, *optional*, defaults to `1.0`):
            Penalty on tokens already in the prompt or the completion; `> 1` favours new tokens.
        generation_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            More `GenerationConfig` (HF) or `SamplingParams` (vLLM) arguments; they override the fields above.
        cache_implementation (`str` or `None`, *optional*, defaults to `None`):
            KV-cache implementation of HF generation (not used with vLLM).
        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample the student's on-policy completions with vLLM (TRL's `VLLMGeneration`) instead of HF `generate`.
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: a vLLM engine in the training process; `"server"`: a `trl vllm-serve` server.
        vllm_model_impl (`str`, *optional*, defaults to `"vllm"`):
            Model implementation of vLLM, `"vllm"` or `"transformers"`.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Offload the vLLM engine's weights while the optimizer steps (colocate).
        vllm_structured_outputs_regex (`str` or `None`, *optional*, defaults to `None`):
            Regex for vLLM structured outputs.
        vllm_server_base_url (`str` or `None`, *optional*, defaults to `None`):
            Base URL of the vLLM server (server mode); overrides host and port.
        vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`):
            Host of the vLLM server (server mode).
        vllm_server_port (`int`, *optional*, defaults to `8000`):
            Port of the vLLM server (server mode).
        vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the vLLM server (server mode).
        vllm_group_port (`int`, *optional*, defaults to `51216`):
            Port of the weight-update group (NCCL communicator, server mode).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            GPU memory fraction of the colocated engine.
        vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`):
            Maximum sequence length of the colocated engine.
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            Tensor-parallel size of the colocated engine.
        log_completions (`bool`, *optional*, defaults to `False`):
            Log the (prompt, completion) pairs sampled since the last log every `logging_steps`: printed with
            `rich` when installed, a table for wandb / trackio when they are in `report_to`, and a parquet file in
            `<output_dir>/completions/`.
        num_completions_to_print (`int` or `None`, *optional*, defaults to `None`):
            Completions printed with `rich`; `None` prints all.
    """

    top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) sampling of on-policy completions."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of on-policy completions; 0 disables it."})
    min_p: float | None = field(
        default=None, metadata={"help": "Minimum token probability, scaled by the most likely token's probability."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalty on tokens already in the prompt or completion (> 1: new tokens)."}
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "More GenerationConfig (HF) / SamplingParams (vLLM) arguments; override the fields above."},
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV-cache implementation of HF generation (not used with vLLM)."}
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample on-policy completions with vLLM (TRL's VLLMGeneration)."}
    )
    vllm_mode: str = field(default="colocate", metadata={"help": "vLLM mode, 'colocate' or 'server'."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM model implementation: vllm or transformers."})
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Offload the colocated engine's weights during the optimizer step."}
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Regex for vLLM structured outputs."}
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Base URL of the vLLM server."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Port of the vLLM server."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the vLLM weight-update group (NCCL)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory fraction of the colocated vLLM engine."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Maximum sequence length of the colocated vLLM engine."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Tensor-parallel size of the colocated vLLM engine."}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "Log sampled (prompt, completion) pairs every logging_steps."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Completions printed with rich; None prints all."}
    )

    def check_generation_fields(self, name: str) -> None:
        """Clear errors for out-of-range sampling settings, naming `name`'s field."""
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{name}.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"{name}.top_k must be >= 0 (0 disables top-k), got {self.top_k}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"{name}.min_p must be in [0, 1] or None, got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"{name}.repetition_penalty must be > 0, got {self.repetition_penalty}.")
        if self.generation_kwargs is not None and not isinstance(_json_object(self.generation_kwargs), dict):
            raise ValueError(f"{name}.generation_kwargs must be a dict (or a JSON object string), got "
                             f"{self.generation_kwargs!r}.")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"{name}.vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}.")
        if self.num_completions_to_print is not None and self.num_completions_to_print < 0:
            raise ValueError(f"{name}.num_completions_to_print must be >= 0 or None.")


def _json_object(value: Any) -> Any:
    """A JSON string as TrainingArguments' `__post_init__` will parse it (own fields are checked before it runs)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return None


def hf_generation_kwargs(args, max_new_tokens: int, pad_token_id: int | None, eos_token_id) -> dict[str, Any]:
    """`GenerationConfig` arguments of on-policy sampling, built as TRL's `DistillationTrainer` builds them.

    `use_cache` is on: TRL's `unwrap_model_for_generation` switches gradient checkpointing off while generating, so
    the KV cache works even in a run that checkpoints (without it every new token re-runs the whole sequence).
    """
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": True,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "cache_implementation": args.cache_implementation,
        "use_cache": True,
    }
    kwargs.update(args.generation_kwargs or {})
    return kwargs


# `VLLMGeneration` arguments taken from TRL's config fields of the same name, with a `vllm_` prefix for these.
VLLM_FIELDS = ("mode", "structured_outputs_regex", "server_base_url", "server_host", "server_port", "group_port",
               "server_timeout", "tensor_parallel_size", "gpu_memory_utilization", "max_model_length",
               "enable_sleep_mode", "model_impl")
SAMPLING_FIELDS = ("repetition_penalty", "temperature", "top_p", "top_k", "min_p", "generation_kwargs")


def make_vllm_generation(trainer, max_completion_length: int):
    """TRL's `VLLMGeneration` for `trainer`'s student, configured from its args as `DistillationTrainer` does."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ImportError(
            f"{type(trainer.args).__name__}.use_vllm=True needs vLLM, which is not installed: "
            "`pip install trl[vllm]` (a CUDA machine), or set use_vllm=False to sample with HF generate."
        )
    from trl.generation.vllm_generation import VLLMGeneration

    args = trainer.args
    return VLLMGeneration(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        **{name: getattr(args, f"vllm_{name}") for name in VLLM_FIELDS},
        **{name: getattr(args, name) for name in SAMPLING_FIELDS},
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size
        * args.gradient_accumulation_steps,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        max_completion_length=max_completion_length,
        logprobs=None,  # the loss uses the teacher's distribution, not the sampled log-probs
    )


class _SampledSequences:
    """Stands where a model's `generate` is called and returns sequences sampled elsewhere (vLLM), so that the HF
    path's post-processing (EOS cut, masks, labels) turns them into training inputs unchanged."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def generate(self, **_):
        return SimpleNamespace(sequences=self.sequences)


def append_completions(prompts: torch.Tensor, completions: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """`[prompts | completions]` laid out as HF `generate` returns them: the (padded) prompt block as given, then
    the completions right-padded with `pad_token_id` to the longest one."""
    width = max((len(c) for c in completions), default=0)
    block = torch.full((len(completions), width), pad_token_id, dtype=prompts.dtype, device=prompts.device)
    for i, completion in enumerate(completions):
        block[i, : len(completion)] = torch.tensor(completion, dtype=prompts.dtype, device=prompts.device)
    return torch.cat([prompts, block], dim=1)


class OnPolicyGenerationMixin:
    """Sampling for a GKD-style trainer (`self.generate_on_policy_outputs(model, inputs, generation_config)`).

    Call `_setup_generation(max_new_tokens)` at the end of `__init__`; `_sample(generator, inputs, on_policy)` returns
    `(input_ids, attention_mask, labels)`.
    """

    def _setup_generation(self, max_new_tokens: int) -> None:
        args = self.args
        eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = self.processing_class.eos_token_id
        self.generation_kwargs = hf_generation_kwargs(
            args, max_new_tokens, self.processing_class.pad_token_id, eos_token_id
        )
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        logs_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes
        self._completion_logs = {"prompt": deque(maxlen=logs_size), "completion": deque(maxlen=logs_size)}
        self.vllm_generation = None
        if args.use_vllm:
            if args.lmbda == 0:
                warnings.warn(
                    f"{type(args).__name__}.use_vllm=True with lmbda=0: the student never samples, vLLM is unused.",
                    stacklevel=3,
                )
            self.vllm_generation = make_vllm_generation(self, max_new_tokens)
            self._last_loaded_step = -1  # weights are pushed before the first generation of each optimizer step

    def _sample(self, generator, inputs: dict, on_policy: bool):
        """Completions of `inputs["prompts"]` by `generator` (HF `generate`), or the student's through vLLM."""
        if on_policy and self.vllm_generation is not None:
            if self.state.global_step != self._last_loaded_step:  # once per optimizer step, as DistillationTrainer
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step
            prompts = [
                row[mask.bool()].tolist() for row, mask in zip(inputs["prompts"], inputs["prompt_attention_mask"])
            ]
            _, completions, _, _ = self.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)
            sequences = append_completions(inputs["prompts"], completions, self.processing_class.pad_token_id)
            ids, attention_mask, labels = self.generate_on_policy_outputs(
                _SampledSequences(sequences), inputs, self.generation_config
            )
        else:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(
                generator,
                self.accelerator,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped:
                ids, attention_mask, labels = self.generate_on_policy_outputs(
                    unwrapped, inputs, self.generation_config
                )
        if self.args.log_completions:
            self._record_completions(inputs, ids, labels)
        return ids, attention_mask, labels

    def _record_completions(self, inputs, ids, labels) -> None:
        decode = self.processing_class.decode
        prompts = [decode(row[mask.bool()], skip_special_tokens=True)
                   for row, mask in zip(inputs["prompts"], inputs["prompt_attention_mask"])]
        completions = [decode(row[label != -100], skip_special_tokens=True) for row, label in zip(ids, labels)]
        self._completion_logs["prompt"].extend(gather_object(prompts))
        self._completion_logs["completion"].extend(gather_object(completions))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if not (self.args.log_completions and self._completion_logs["prompt"] and self.model.training):
            return
        prompts, completions = list(self._completion_logs["prompt"]), list(self._completion_logs["completion"])
        self._completion_logs["prompt"].clear()
        self._completion_logs["completion"].clear()
        if not self.accelerator.is_main_process:
            return
        step = self.state.global_step
        from transformers.utils import is_rich_available

        if is_rich_available():
            from trl.trainer.utils import print_prompt_completions_sample

            print_prompt_completions_sample(prompts, completions, {}, None, step, self.args.num_completions_to_print)
        import pandas as pd

        table = pd.DataFrame({"step": [step] * len(prompts), "prompt": prompts, "completion": completions})
        folder = os.path.join(self.args.output_dir, "completions")
        os.makedirs(folder, exist_ok=True)
        table.to_parquet(os.path.join(folder, f"completions_{step:05d}.parquet"))
        report_to = self.args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(dataframe=table)})
        if "trackio" in report_to:
            import trackio

            trackio.log({"completions": trackio.Table(dataframe=table)})
