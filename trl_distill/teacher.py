"""Loading teachers (and any frozen model): optionally 4-bit, optionally with a LoRA adapter.

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

The model helpers (`trl_distill.models`) and vocabulary checks (`trl_distill.vocabulary`) that used to live here are
re-exported, so `from trl_distill.teacher import output_head, check_vocab_compatible` keeps working.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from ._compat import convert_weight_packed_for_cpu_inverse
from .models import (  # noqa: F401  (re-exported)
    _is_peft,
    adapter_disabled,
    backbone_hidden_states,
    causal_lm,
    check_plain_logits,
    head_rows,
    model_name,
    output_head,
    trainable_parameters,
)
from .vocabulary import (  # noqa: F401  (re-exported)
    TAIL_MASS_TOLERANCE,
    check_vocab_compatible,
    load_tokenizer,
    mass_beyond_columns,
)

if TYPE_CHECKING:
    import peft


__all__ = [
    "adapter_disabled",
    "backbone_hidden_states",
    "bnb_4bit_config",
    "causal_lm",
    "check_4bit_supported",
    "check_plain_logits",
    "check_quantization",
    "check_vocab_compatible",
    "disable_cpu_4bit_packing",
    "head_rows",
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
