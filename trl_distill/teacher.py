"""Teacher models: loading (optionally 4-bit, optionally with a LoRA adapter), vocabulary checks, hidden states.

Every trainer gets its teacher through :func:`load_teacher`: base weights frozen, eval mode, and, on request,
bitsandbytes nf4 weights and a PEFT adapter that is the only trainable part (the OKD "online module", or the
aligned half of ADPA's one-base-two-teachers set-up, where :func:`adapter_disabled` gives the reference half).

4-bit on CPU (bitsandbytes >= 0.46): nf4 weights with an fp32 compute dtype run forward and backward, and agree
exactly with an fp32 model holding the dequantized weights, *provided* bitsandbytes' packed CPU inference path is
off. On CPUs with AVX512-BF16, ``Linear4bit`` otherwise repacks its weight in place the first time it runs in eval
mode on an input that needs no grad, and from then on always uses a bf16 kernel with no autograd support: outputs
drift to bf16 precision and gradients to everything upstream of that layer silently become ``None``. A teacher in
eval mode hits this on its first forward, so :func:`load_teacher` turns the path off (:func:`disable_cpu_4bit_packing`).
Without the optional ``kernels`` package that path is not faster either.

:func:`backbone_hidden_states` and :func:`output_head` serve the chunked losses, which multiply the last hidden
state by the head a few rows at a time instead of materialising ``[B, T, V]`` logits.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from ._compat import convert_weight_packed_for_cpu_inverse


if TYPE_CHECKING:
    import peft


__all__ = [
    "adapter_disabled",
    "backbone_hidden_states",
    "bnb_4bit_config",
    "causal_lm",
    "check_4bit_supported",
    "check_vocab_compatible",
    "head_rows",
    "disable_cpu_4bit_packing",
    "load_teacher",
    "load_tokenizer",
    "mass_beyond_columns",
    "model_name",
    "output_head",
    "trainable_parameters",
]

DeviceLike = str | torch.device | None

# (device, bitsandbytes module id) pairs whose 4-bit probe passed; the module id makes a re-imported or
# monkeypatched bitsandbytes probe again.
_PROBED_4BIT: set[tuple[str, int]] = set()


# ----------------------------------------------------------------------------------------------- devices, 4-bit
def _resolve_device(device: DeviceLike) -> torch.device:
    """The device to load on: the given one, else this process's accelerator (its local rank's GPU), else CPU."""
    if device is None:
        for kind in ("cuda", "xpu"):
            backend = getattr(torch, kind, None)
            if backend is not None and backend.is_available():
                # Under `accelerate launch`/torchrun each process owns the GPU of its local rank (accelerate only
                # sets the current device later, when the trainer builds its state), unless the launcher already
                # restricted each process to its own GPU.
                rank = int(os.environ.get("LOCAL_RANK", -1))
                index = rank if 0 <= rank < backend.device_count() else backend.current_device()
                return torch.device(kind, index)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # bitsandbytes device maps and accelerate's device check need an explicit index.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        # bitsandbytes' CPU matmul dequantizes to the compute dtype; fp32 makes it exact w.r.t. the nf4 weights.
        return torch.float32
    if device.type == "cuda":
        # fp16 only on a GPU known to lack bf16 (pre-Ampere).
        return torch.float16 if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else torch.bfloat16
    if device.type == "mps":
        return torch.float16  # bf16 on MPS needs a recent macOS; fp16 works everywhere
    return torch.bfloat16


QUANTIZATIONS = (None, "4bit")


def check_quantization(value: Any, field_name: str) -> None:
    """Raise ValueError naming `field_name` unless `value` is a quantization `load_teacher` accepts."""
    if value not in QUANTIZATIONS:
        raise ValueError(f"{field_name} must be one of {QUANTIZATIONS}, got {value!r}.")


def bnb_4bit_config(device: DeviceLike = None) -> BitsAndBytesConfig:
    """QLoRA's quantization for `device`: nf4 with double quantization, compute dtype fp32 on CPU, bf16 on CUDA
    (fp16 where the GPU lacks bf16)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_compute_dtype(_resolve_device(device)),
    )


def _probe_4bit(bnb: Any, device: torch.device) -> None:
    """Quantize a small weight to nf4 on `device`, then run the autograd matmul forward and backward and compare
    with the dequantized weight: catches a missing native library or backend before any model is loaded."""
    dtype = _compute_dtype(device)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator).to(device=device, dtype=dtype)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    dequantized = bnb.functional.dequantize_4bit(packed, state).to(dtype)
    x = torch.randn(3, 128, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    out = bnb.matmul_4bit(x, packed, quant_state=state)
    out.sum().backward()
    expected = x.detach() @ dequantized.t()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if x.grad is None:
        raise RuntimeError("no gradient flowed through the 4-bit matmul")
    if not torch.allclose(out.detach().float(), expected.float(), rtol=tolerance, atol=tolerance):
        raise RuntimeError("the 4-bit matmul disagrees with its dequantized weight")
    if not torch.allclose(x.grad.float(), dequantized.float().sum(0).expand_as(x), rtol=tolerance, atol=tolerance):
        raise RuntimeError("the 4-bit matmul's gradient disagrees with its dequantized weight")


def check_4bit_supported(device: DeviceLike = None, *, model_name: str = "teacher") -> None:
    """Raise a clear error naming `model_name` unless bitsandbytes can run nf4 (forward and backward) on `device`.

    ImportError when bitsandbytes cannot be imported; RuntimeError when the device is not among its backends or a
    small quantize/matmul/backward probe fails there (e.g. a build without its native library). The probe result
    is cached per device.
    """
    resolved = _resolve_device(device)
    advice = f"or load {model_name} without quantization."
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # transformers refuses the per-process `device_map` a 4-bit load needs under ZeRO-3, which would shard the
        # model instead; ZeRO-3 cannot shard bitsandbytes' packed weights either.
        raise ValueError(
            f"Cannot load {model_name} in 4-bit under DeepSpeed ZeRO-3. Use ZeRO-2 or DDP with the 4-bit teacher "
            "(one nf4 copy per process), or an unquantized (bf16) teacher that ZeRO-3 shards."
        )
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken build failing while it loads its native library
        raise ImportError(
            f"Loading {model_name} in 4-bit needs bitsandbytes, which could not be imported "
            f"({type(exc).__name__}: {exc}). Install it with `pip install 'bitsandbytes>=0.46'`, {advice}"
        ) from exc
    version = getattr(bnb, "__version__", "?")
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and resolved.type not in supported:
        raise RuntimeError(
            f"Cannot load {model_name} in 4-bit on {resolved}: bitsandbytes {version} supports "
            f"{sorted(supported)}. Choose a supported device, {advice}"
        )
    key = (str(resolved), id(bnb))
    if key in _PROBED_4BIT:
        return
    try:
        _probe_4bit(bnb, resolved)
    except Exception as exc:
        raise RuntimeError(
            f"Cannot load {model_name} in 4-bit on {resolved}: bitsandbytes {version} is installed but its nf4 "
            f"kernels failed there ({type(exc).__name__}: {exc}). Reinstall a bitsandbytes build for this "
            f"platform, {advice}"
        ) from exc
    _PROBED_4BIT.add(key)


def disable_cpu_4bit_packing(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` in `model` on its autograd-capable path on CPU; return how many.

    Turns off bitsandbytes' packed bf16 CPU inference path and unpacks weights already packed by an earlier
    eval-mode forward (see the module docstring for why); such weights keep the bf16 rounding packing gave their
    block scales (~1e-3 relative). No effect on GPU layers. Also needed for a QLoRA student trained on CPU with
    evaluation in between: evaluation packs the layers and later training steps would lose their gradients.
    """
    count = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # attribute of bitsandbytes' Linear4bit only
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = convert_weight_packed_for_cpu_inverse(weight.data, state)
        count += 1
    return count


def _is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        hasattr(module, "support_avx512bf16_for_cpu") for module in model.modules()
    )


def _quantization_method(model: torch.nn.Module) -> str | None:
    if getattr(model, "is_loaded_in_8bit", False):
        return "8-bit bitsandbytes"
    method = getattr(model, "quantization_method", None)
    if method is None and getattr(model, "is_quantized", False):
        method = "unknown"
    return None if method is None else str(getattr(method, "value", method))


# ----------------------------------------------------------------------------------------------- PEFT helpers
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


# ----------------------------------------------------------------------------------------------- loading
def _init_kwargs(model_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Copy of `model_init_kwargs` with `torch_dtype` renamed to `dtype` and dtype strings made torch dtypes."""
    kwargs = dict(model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ValueError("model_init_kwargs: give `dtype` or `torch_dtype`, not both.")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"model_init_kwargs: unknown dtype {dtype!r} (use e.g. 'bfloat16', 'float32', 'auto').")
        kwargs["dtype"] = resolved
    return kwargs


def _from_pretrained(
    path: str, kwargs: dict[str, Any], quantization: str | None, device: DeviceLike, name: str
) -> PreTrainedModel:
    kwargs = dict(kwargs)
    if quantization == "4bit":
        if "quantization_config" in kwargs:
            raise ValueError(
                f"{name}: give either quantization='4bit' or a `quantization_config` in model_init_kwargs, not both."
            )
        resolved = _resolve_device(device)
        config = bnb_4bit_config(resolved)
        kwargs["quantization_config"] = config
        # bitsandbytes layers are placed while loading; accelerate later insists the model sits on its device.
        kwargs.setdefault("device_map", {"": str(resolved)})
        # Unquantized parts (embeddings, norms, head) in the compute dtype: no casts between layers.
        kwargs.setdefault("dtype", config.bnb_4bit_compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:  # missing local path, unreachable or unknown Hub id, missing weights
        raise OSError(f"Could not load the {name} model {path!r}: {exc}") from exc
    except (ValueError, KeyError) as exc:  # unrecognised config / architecture
        raise ValueError(f"Could not load the {name} model {path!r} as a causal LM: {exc}") from exc
    if quantization is None and device is not None and "device_map" not in kwargs:
        model.to(_resolve_device(device))
    return model


def _in_memory(
    model: torch.nn.Module, kwargs: dict[str, Any], quantization: str | None, device: DeviceLike, name: str
) -> torch.nn.Module:
    label = model_name(model)
    if quantization == "4bit" and not _is_4bit(model):
        method = _quantization_method(model)
        if method is not None:
            raise ValueError(f"The {name} model {label!r} is already quantized ({method}); it cannot be made 4-bit.")
        if _is_peft(model):
            raise ValueError(
                f"The {name} model {label!r} is a PeftModel: pass its base model and the adapter (`adapter=`) "
                "separately to load it in 4-bit."
            )
        warnings.warn(
            f"The {name} model {label!r} was given in memory and unquantized: saving it to a temporary directory "
            "and reloading it in 4-bit (nf4). Pass a path, or a model already loaded in 4-bit, to avoid the copy.",
            UserWarning,
            stacklevel=3,
        )
        with tempfile.TemporaryDirectory(prefix="trl_distill_teacher_") as directory:
            # This copy is private to the process, but transformers' save_pretrained writes nothing on processes
            # other than 0 once torch.distributed is initialized (under `accelerate launch`): let every process write.
            model.should_save_on_this_rank = lambda is_main_process: True
            try:
                model.save_pretrained(directory)
            finally:
                del model.should_save_on_this_rank
            reloaded = _from_pretrained(directory, kwargs, "4bit", device, name)
        # Keep the original's name (maybe empty) rather than a deleted temporary path.
        original = getattr(model, "name_or_path", "") or ""
        reloaded.name_or_path = original
        reloaded.config._name_or_path = original
        return reloaded
    if kwargs:
        warnings.warn(
            f"model_init_kwargs are ignored: the {name} model {label!r} is already instantiated.",
            UserWarning,
            stacklevel=3,
        )
    if device is not None and _quantization_method(model) is None:
        model.to(_resolve_device(device))
    return model


def _attach_adapter(
    model: torch.nn.Module, adapter: str | os.PathLike | peft.PeftConfig, trainable: bool, name: str
) -> torch.nn.Module:
    from peft import PeftConfig, PeftModel, get_peft_model

    if _is_peft(model):
        raise ValueError(
            f"The {name} model {model_name(model)!r} already has an adapter; pass its base model instead."
        )
    if isinstance(adapter, PeftConfig):
        return get_peft_model(model, adapter)
    if isinstance(adapter, (str, os.PathLike)):
        path = os.fspath(adapter)
        try:
            return PeftModel.from_pretrained(model, path, is_trainable=trainable)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"Could not load the {name} adapter {path!r} onto {model_name(model)!r}: {exc}") from exc
    raise TypeError(f"{name}: `adapter` must be a path or a peft.PeftConfig, got {type(adapter).__name__}.")


def load_teacher(
    model: str | os.PathLike | PreTrainedModel,
    *,
    quantization: Literal["4bit"] | None = None,
    adapter: str | os.PathLike | peft.PeftConfig | None = None,
    trainable_adapter: bool = False,
    model_init_kwargs: dict[str, Any] | None = None,
    device: DeviceLike = None,
    name: str = "teacher",
) -> PreTrainedModel:
    """Load (or adopt) a teacher: frozen base weights, eval mode, optional nf4 weights and PEFT adapter.

    Args:
        model: a Hub id or local path (loaded with ``AutoModelForCausalLM``), or a model in memory (frozen in
            place). With ``quantization="4bit"`` an unquantized in-memory model is saved to a temporary directory
            and reloaded in 4-bit (with a warning); a model already in 4-bit is used as it is.
        quantization: ``"4bit"`` for bitsandbytes nf4 (:func:`bnb_4bit_config`); checked with
            :func:`check_4bit_supported` before anything is loaded.
        adapter: a saved PEFT adapter's path, or a ``peft.PeftConfig`` for a new adapter.
        trainable_adapter: make the adapter's parameters trainable (the base stays frozen either way).
        model_init_kwargs: extra ``from_pretrained`` arguments; dtype strings such as ``"bfloat16"`` are accepted.
            For 4-bit the dtype of the unquantized layers defaults to the compute dtype.
        device: where to load; default for 4-bit: this process's accelerator, else CPU. Unquantized models are
            left where ``from_pretrained`` puts them unless a device is given.
        name: the role named in error messages (e.g. ``"teacher"``, ``"anchor"``).

    Returns:
        The model (a ``PeftModel`` when an adapter is attached), in eval mode.

    Nothing beyond freezing is done for a trainable adapter on a 4-bit base: unlike ``prepare_model_for_kbit_training``
    no gradient checkpointing is switched on (so no input-embedding grads are needed: the adapter's own parameters
    start the graph) and nothing is upcast to fp32 (PEFT already keeps adapter weights in fp32).
    """
    check_quantization(quantization, f"{name}: quantization")
    if trainable_adapter and adapter is None and not _is_peft(model):
        raise ValueError(f"{name}: trainable_adapter=True needs an adapter (a path or a peft.PeftConfig).")
    if quantization == "4bit" and not (isinstance(model, torch.nn.Module) and _is_4bit(model)):
        check_4bit_supported(device, model_name=f"the {name} model {model_name(model)!r}")
    kwargs = _init_kwargs(model_init_kwargs)

    if isinstance(model, (str, os.PathLike)):
        loaded = _from_pretrained(os.fspath(model), kwargs, quantization, device, name)
    elif isinstance(model, torch.nn.Module):
        loaded = _in_memory(model, kwargs, quantization, device, name)
    else:
        raise TypeError(f"{name}: expected a path, a Hub id or a model, got {type(model).__name__}.")

    if adapter is not None:
        loaded = _attach_adapter(loaded, adapter, trainable_adapter, name)
    if trainable_adapter:
        # PEFT marks exactly the adapter (and any modules_to_save) trainable and freezes the rest.
        if not trainable_parameters(loaded):
            raise ValueError(f"The {name} adapter on {model_name(loaded)!r} has no trainable parameters.")
    else:
        loaded.requires_grad_(False)
    if _is_4bit(loaded):
        disable_cpu_4bit_packing(loaded)
    return loaded.eval()


# ----------------------------------------------------------------------------------------------- vocabulary
def _tokenizer_size(tokenizer: Any) -> int:
    """Rows a head needs to cover the tokenizer: its length, or its largest id + 1 if ids have gaps."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


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


def _vocab_difference(student: dict[str, int], teacher: dict[str, int], limit: int = 5) -> list[str]:
    missing = float("inf")
    differing = sorted(
        (token for token in student.keys() | teacher.keys() if student.get(token) != teacher.get(token)),
        key=lambda token: (student.get(token, missing), teacher.get(token, missing), token),
    )
    return [f"{tok!r}: {student.get(tok, 'absent')} vs {teacher.get(tok, 'absent')}" for tok in differing[:limit]]


def _role_name(role: str, model: torch.nn.Module | None) -> str:
    return role if model is None else f"{role} ({model_name(model)})"


def check_vocab_compatible(
    student_tokenizer: Any,
    teacher_tokenizer: Any = None,
    *,
    student_model: torch.nn.Module | None = None,
    teacher_model: torch.nn.Module | None = None,
    student_name: str | None = None,
    teacher_name: str | None = None,
) -> int:
    """Check that student and teacher share a vocabulary; return how many vocabulary columns losses compare.

    Tokenizers, when both are given, must map the same tokens to the same ids. Output heads may be padded past
    the tokenizer (real checkpoints pad to a multiple of 64 or 128) but each must cover it. Without any tokenizer
    the heads must have equal sizes. Returns ``min(student head rows, teacher head rows)`` (at least the
    tokenizer's size), or the tokenizer's size when no model is given. Raises ValueError naming the models
    (by default "student (<name_or_path>)" and "teacher (<name_or_path>)").
    """
    student_name = student_name or _role_name("student", student_model)
    teacher_name = teacher_name or _role_name("teacher", teacher_model)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            examples = "; ".join(_vocab_difference(student_vocab, teacher_vocab))
            raise ValueError(
                f"The {student_name} and {teacher_name} models do not share a vocabulary: the {student_name} "
                f"tokenizer has {len(student_tokenizer)} tokens, the {teacher_name} tokenizer "
                f"{len(teacher_tokenizer)}; tokens whose ids differ ({student_name} vs {teacher_name}): {examples}. "
                "Distillation compares the two distributions token by token, so both need the same tokenizer "
                "(an output head padded to a larger size is fine)."
            )
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    needed = None if tokenizer is None else _tokenizer_size(tokenizer)

    models = ((student_name, student_model), (teacher_name, teacher_model))
    heads = [(label, head_rows(model)) for label, model in models if model is not None]
    for label, rows in heads:
        if needed is not None and rows < needed:
            raise ValueError(
                f"The {label} model's output head has {rows} rows but the tokenizer has {needed} tokens: it cannot "
                f"score every token, so the {student_name} and {teacher_name} vocabularies are not compatible."
            )
    if needed is None and len(heads) == 2 and heads[0][1] != heads[1][1]:
        raise ValueError(
            f"The {student_name} ({heads[0][1]} vocabulary rows) and {teacher_name} ({heads[1][1]} rows) models have "
            "different vocabulary sizes. Pass their tokenizers so a head that is only padded larger can be accepted."
        )
    if heads:
        return min(rows for _, rows in heads)
    if needed is None:
        raise ValueError("check_vocab_compatible needs at least one tokenizer or one model.")
    return needed


def load_tokenizer(path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model at `path` (a local folder or a Hub id), or None when there is none to load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer files, or a tokenizer class it cannot build
        return None


# The largest probability a teacher may put on output rows beyond the compared columns, at any attended position of
# the first batch. Padding rows of a trained checkpoint (never a target) carry far less; rows of real tokens that the
# student's tokenizer lacks carry far more.
TAIL_MASS_TOLERANCE = 1e-3


@torch.no_grad()
def mass_beyond_columns(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, columns: int, chunk_size: int = 256
) -> Tensor:
    """The probability `model` puts on its output rows `columns:` at each attended position, as a flat ``[N]`` tensor.

    Distillation compares only the first `columns` vocabulary columns, so a teacher whose head is larger loses this
    mass silently. Computed from the backbone's hidden states, `chunk_size` positions at a time (no full logits);
    models that transform their logits after the head (soft-capping) use their logits instead.
    """
    positions = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    try:
        rows = backbone_hidden_states(model, input_ids, attention_mask)[positions]
        head = output_head(model)
        weight, bias = head.weight, head.bias

        def project(chunk: Tensor) -> Tensor:
            return torch.nn.functional.linear(chunk.to(weight.dtype), weight, bias)
    except (NotImplementedError, TypeError):  # soft-capped or scaled logits, a quantized or adapted head
        rows = causal_lm(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[positions]

        def project(chunk: Tensor) -> Tensor:
            return chunk

    masses = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = project(rows[start : start + chunk_size]).float()
        # 1 - p(first columns) = -expm1(lse(first columns) - lse(all)), exact for tiny masses.
        masses.append(-torch.expm1(logits[:, :columns].logsumexp(-1) - logits.logsumexp(-1)))
    return torch.cat(masses) if masses else rows.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- hidden states
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
