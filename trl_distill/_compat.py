"""Every private name of TRL, transformers, bitsandbytes, torch and argparse that trl_distill relies on, in one place.

A TRL (or transformers, bitsandbytes) release may rename or remove any of these without notice. The package imports
the private functions it calls from here only, and `PRIVATE_NAMES` lists all of them together with the private
methods our trainers override or call and the private attributes they read: `tests/test_package.py` resolves every
entry and fails naming the one that moved, so an upgrade breaks one test instead of a training run.

Where TRL has a public equivalent, the package uses it; what remains has none:
- `_ForwardRedirection`: runs a computation as a module's forward, so DDP/FSDP/ZeRO-3 hooks fire around code that
  reads weights directly (the chunked losses);
- `_tokenize`: TRL's chat-template-aware tokenization of one prompt or conversation (ADPO's listwise rows);
- `_convert_weight_packed_for_cpu_inverse`: bitsandbytes' inverse of its packed CPU weight format;
- `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`: torch's way to keep the boolean buffers out
  of DDP's broadcast (`ignore_bias_buffers`), see `ignore_in_ddp`; argparse's `_actions`, see `option_strings`;
- `DPOTrainer._prepare_dataset`: TRL's own DPO tokenization, which the offline teacher (`teacher-topk`) must reproduce
  token for token outside a trainer, see `tokenize_preference_dataset`.

`PRIVATE_NAMES` also lists the public names the package takes from TRL modules that TRL does not export at its top
level (model card, vLLM sampling, completion logging, `accelerate launch` configs, the DPO collator): no underscore,
but no stability promise either. Those are imported where they are used, lazily (tests stand in for `VLLMGeneration`
there), and resolved here by the same test.
"""

from __future__ import annotations

import importlib
from typing import Any

from trl.data_utils import _tokenize as tokenize
from trl.models.utils import _ForwardRedirection as ForwardRedirection

__all__ = ["PRIVATE_NAMES", "ForwardRedirection", "convert_weight_packed_for_cpu_inverse", "ignore_in_ddp",
           "option_strings", "resolve", "tokenize", "tokenize_preference_dataset"]

# Dotted paths: a module, then attributes. Methods are those we override (a rename would silently skip our code) or
# call; attributes are read on trainer instances, so they are listed as `Class.__init__` sets them (checked by name
# in the class's source).
PRIVATE_NAMES = (
    # functions called
    "trl.models.utils._ForwardRedirection",
    "trl.data_utils._tokenize",
    "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse",
    # transformers.Trainer methods overridden (DistillTrainerMixin, TeacherTrainerMixin) or called
    "transformers.Trainer._save",
    "transformers.Trainer._save_optimizer_and_scheduler",
    "transformers.Trainer._load_optimizer_and_scheduler",
    "transformers.Trainer._load_from_checkpoint",
    "transformers.Trainer._get_grad_norm",
    "transformers.Trainer._get_num_items_in_batch",
    "transformers.Trainer._prepare_inputs",
    "transformers.Trainer._set_signature_columns_if_needed",
    # TRL trainer methods overridden or called
    "trl.DPOTrainer._compute_loss",
    "trl.DPOTrainer._prepare_dataset",
    "trl.DPOTrainer._precompute_ref_logps",
    "trl.experimental.gkd.GKDTrainer.generate_on_policy_outputs",
    # instance attributes read or set (set in these classes' __init__)
    "trl.DPOTrainer.__init__:self._tokenizer",
    "trl.DPOTrainer.__init__:self.precompute_ref_logps",
    "trl.DPOTrainer.__init__:self._metrics",
    "trl.SFTTrainer.__init__:self._metrics",
    "trl.SFTTrainer.__init__:self._total_train_tokens",
    "transformers.Trainer.__init__:self._signature_columns",
    "transformers.PretrainedConfig.__init__:self._name_or_path",
    # torch and the standard library
    "torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
    "argparse.ArgumentParser.__init__:self._actions",
    # public names of TRL modules not exported at TRL's top level (imported lazily where used)
    "trl.trainer.utils.generate_model_card",
    "trl.trainer.utils.get_trackio_space_url",
    "trl.trainer.utils.get_comet_experiment_url",
    "trl.trainer.utils.print_prompt_completions_sample",
    "trl.generation.vllm_generation.VLLMGeneration",
    "trl.generation.vllm_generation.VLLMGeneration.sync_weights",
    "trl.generation.vllm_generation.VLLMGeneration.generate",
    "trl.import_utils.is_vllm_available",
    "trl.cli.accelerate_config.resolve_accelerate_config_argument",
    "trl.trainer.dpo_trainer.DataCollatorForPreference",
)


def resolve(dotted: str) -> Any:
    """The object a `PRIVATE_NAMES` entry names; raises ImportError/AttributeError naming the entry if it moved.

    `pkg.mod.Class.__init__:self.attr` checks that `Class.__init__` (or a method it inherits) assigns `self.attr`."""
    path, _, assigned = dotted.partition(":")
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(obj, name):
                raise AttributeError(f"{dotted}: {'.'.join(parts[:split])} has no attribute path {parts[split:]}")
            obj = getattr(obj, name)
        break
    else:
        raise ImportError(f"{dotted}: no module of this path can be imported")
    if assigned:
        import inspect

        owner = importlib.import_module(".".join(parts[:-2]))
        cls = getattr(owner, parts[-2])
        sources = []
        for klass in cls.__mro__:
            try:
                sources.append(inspect.getsource(klass))
            except (OSError, TypeError):  # builtins and classes without source
                continue
        if not any(f"{assigned} =" in source or f"{assigned}:" in source for source in sources):
            raise AttributeError(f"{dotted}: no class in {cls.__name__}'s MRO assigns {assigned}")
    return obj


def convert_weight_packed_for_cpu_inverse(data, quant_state):
    """bitsandbytes' own (private) inverse of its packed CPU format, the one its `.cuda()`/`state_dict()` use."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


def ignore_in_ddp(model, names: list[str]) -> None:
    """Keep the named parameters / buffers of `model` out of DDP's synchronisation: torch's own (private) static
    method for it, until the public API of pytorch#43690 exists (TRL's DPO script sets the attribute it writes)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def option_strings(parser) -> set[str]:
    """Every option string (`--foo`, `-f`) an `argparse.ArgumentParser` accepts (argparse has no public accessor)."""
    return {option for action in parser._actions for option in action.option_strings}


def tokenize_preference_dataset(tokenizer, dataset, dataset_name: str):
    """TRL's own DPO tokenization of a preference dataset (`prompt_ids` / `chosen_ids` / `rejected_ids`), outside a
    trainer: `DPOTrainer._prepare_dataset`, which reads only `self._tokenizer` and the three fields given here.

    `max_length=None` keeps every row (a trainer drops rows whose prompt alone fills its `max_length`)."""
    from types import SimpleNamespace

    from trl import DPOTrainer

    owner = SimpleNamespace(_tokenizer=getattr(tokenizer, "tokenizer", tokenizer))
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(owner, dataset, tokenizer, args, dataset_name)
