"""Tests for `trl_distill.teacher`: loading (fp32, 4-bit nf4 on CPU, LoRA adapters), vocabulary checks, hidden states.

Everything is built locally: a tiny random Llama saved to a temporary directory and a character-level tokenizer.
"""

import sys
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trl_distill import teacher as teacher_module
from trl_distill.teacher import (
    adapter_disabled,
    backbone_hidden_states,
    bnb_4bit_config,
    check_4bit_supported,
    check_vocab_compatible,
    disable_cpu_4bit_packing,
    load_teacher,
    load_tokenizer,
    mass_beyond_columns,
    model_name,
    output_head,
    trainable_parameters,
)


bnb = pytest.importorskip("bitsandbytes")

CHARS = "0123456789+= abcd"  # 17 characters + 3 specials = 20 tokens; model heads have 32 rows (padded)


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(("<pad>", "<unk>", "<eos>", *chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_llama(vocab_size: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def lora(**overrides) -> LoraConfig:
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    return LoraConfig(**{**settings, **overrides})


def non_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Includes the 4-bit packed weights and their quantization statistics.
    return {name: t.detach().clone() for name, t in model.state_dict().items() if "lora_" not in name}


def assert_roughly_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The loose agreement expected between a 4-bit model and its fp32 original."""
    assert (actual - expected).abs().max() < 0.3 * expected.abs().max()
    assert torch.corrcoef(torch.stack([actual.flatten(), expected.flatten()]))[0, 1] > 0.95


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 20, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding on the second row
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def fp32_logits(base_dir, batch):
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(base_dir)(*batch).logits


# ----------------------------------------------------------------------------------------------- plain loading
def test_load_from_path_is_frozen_eval_and_unchanged(base_dir, batch, fp32_logits):
    model = load_teacher(base_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert trainable_parameters(model) == []
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model_name(model) == str(base_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(*batch).logits, fp32_logits, rtol=0, atol=0)


def test_load_from_memory_freezes_in_place():
    model = tiny_llama().train()
    assert trainable_parameters(model)
    with pytest.warns(UserWarning, match="model_init_kwargs are ignored"):
        loaded = load_teacher(model, model_init_kwargs={"dtype": "float32"})
    assert loaded is model
    assert not model.training and trainable_parameters(model) == []
    assert model_name(model) == "LlamaForCausalLM"


def test_model_init_kwargs_accept_dtype_strings(base_dir):
    model = load_teacher(base_dir, model_init_kwargs={"dtype": "bfloat16"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = load_teacher(base_dir, model_init_kwargs={"torch_dtype": "torch.float64"})
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="unknown dtype"):
        load_teacher(base_dir, model_init_kwargs={"dtype": "float17"})


def test_argument_errors(base_dir):
    with pytest.raises(ValueError, match="quantization"):
        load_teacher(base_dir, quantization="8bit")
    with pytest.raises(ValueError, match="needs an adapter"):
        load_teacher(base_dir, trainable_adapter=True)


def test_missing_model_path_names_model_and_role(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError) as error:
        load_teacher(missing, name="my-teacher")
    assert "my-teacher" in str(error.value) and str(missing) in str(error.value)


def test_missing_adapter_path_names_adapter_and_role(base_dir, tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises((OSError, ValueError)) as error:
        load_teacher(base_dir, adapter=missing, name="my-teacher")
    assert "my-teacher" in str(error.value) and str(missing) in str(error.value)


# ----------------------------------------------------------------------------------------------- 4-bit
def test_bnb_4bit_config():
    config = bnb_4bit_config("cpu")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
        assert bnb_4bit_config("cuda").bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_load_on_cpu_is_close_to_fp32(base_dir, batch, fp32_logits):
    model = load_teacher(base_dir, quantization="4bit", device="cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert model.is_loaded_in_4bit and not model.training and trainable_parameters(model) == []
    head = output_head(model)
    assert not isinstance(head, bnb.nn.Linear4bit) and head.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(*batch).logits
    assert logits.dtype == torch.float32
    # nf4 keeps ~4 bits per weight: close to, not equal to, the fp32 model (random tiny weights: ~15% max error).
    assert_roughly_equal(logits, fp32_logits)
    assert not torch.equal(logits, fp32_logits)
    # The eval-mode no-grad forward must not have switched layers to bitsandbytes' packed bf16 CPU path.
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)


def test_4bit_from_memory_reloads_with_warning_and_keeps_4bit_models(base_dir, batch):
    from_path = load_teacher(base_dir, quantization="4bit")
    in_memory = LlamaForCausalLM.from_pretrained(base_dir)
    with pytest.warns(UserWarning, match="temporary directory"):
        reloaded = load_teacher(in_memory, quantization="4bit")
    assert reloaded is not in_memory and reloaded.is_loaded_in_4bit
    assert model_name(reloaded) == str(base_dir)
    with torch.no_grad():  # nf4 quantization is deterministic
        torch.testing.assert_close(reloaded(*batch).logits, from_path(*batch).logits, rtol=0, atol=0)
    assert load_teacher(from_path, quantization="4bit") is from_path


def test_check_4bit_supported_without_bitsandbytes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match="my-teacher.*bitsandbytes"):
        check_4bit_supported("cpu", model_name="my-teacher")
    # Raised before any loading: a missing path would otherwise give an OSError.
    with pytest.raises(ImportError, match="my-teacher"):
        load_teacher(tmp_path / "no-such-model", quantization="4bit", name="my-teacher")


def test_4bit_under_deepspeed_zero3_is_refused_before_loading(tmp_path):
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig

    # transformers' own switch: ZeRO-3 counts as enabled while this object lives (as the Trainer holds it)
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match="my-teacher.*in 4-bit under DeepSpeed ZeRO-3. Use ZeRO-2 or DDP"):
            load_teacher(tmp_path / "no-such-model", quantization="4bit", name="my-teacher")
    finally:
        del zero3
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # nothing leaks into the other tests


def test_check_4bit_supported_broken_backend(monkeypatch):
    monkeypatch.setattr(teacher_module, "_PROBED_4BIT", set())
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})
    with pytest.raises(RuntimeError, match="my-teacher.*supports"):
        check_4bit_supported("cpu", model_name="my-teacher")
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("native library not found")

    monkeypatch.setattr(teacher_module, "_PROBED_4BIT", set())
    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(RuntimeError, match="my-teacher.*native library not found"):
        check_4bit_supported("cpu", model_name="my-teacher")


# ----------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_new_trainable_adapter_trains_only_lora(base_dir, batch, quantization):
    model = load_teacher(base_dir, quantization=quantization, adapter=lora(), trainable_adapter=True)
    assert isinstance(model, PeftModel) and not model.training
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all("lora_" in name for name in trainable)  # layers x modules x A/B
    before = non_adapter_state(model)

    with torch.no_grad():
        model(*batch)  # an eval-mode no-grad forward first: what once cut gradients on CPU 4-bit
    model(*batch).logits.pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
        elif "lora_B" in name:  # lora_A's gradient is zero while B is (initially) zero
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    torch.optim.SGD(trainable_parameters(model), lr=0.1).step()

    after = non_adapter_state(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_4bit_lora_matches_dequantized_fp32_model(base_dir, batch):
    """On CPU the 4-bit path computes exactly what an fp32 model with the dequantized weights computes, gradients
    included, even for a model whose layers bitsandbytes had already packed for bf16 inference."""
    quantized = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_4bit_config("cpu"), device_map={"": "cpu"}, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        quantized(*batch)  # on AVX512-BF16 CPUs this packs every Linear4bit in place
    torch.manual_seed(0)
    model = load_teacher(quantized, quantization="4bit", adapter=lora(init_lora_weights=False), trainable_adapter=True)

    reference = LlamaForCausalLM.from_pretrained(base_dir).eval()
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference.get_submodule(name.replace(".base_layer", "")).weight.data.copy_(weight)
    reference = get_peft_model(reference, lora(init_lora_weights=False))
    lora_weights = {name: t for name, t in model.state_dict().items() if "lora_" in name}
    assert not reference.load_state_dict(lora_weights, strict=False).unexpected_keys  # same LoRA weights
    reference.eval()

    logits, expected = model(*batch).logits, reference(*batch).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected_grads.keys() and len(grads) == 8
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_disable_cpu_4bit_packing_round_trips(base_dir, batch):
    model = load_teacher(base_dir, quantization="4bit")
    with torch.no_grad():
        expected = model(*batch).logits
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:  # force bitsandbytes' packed path back on, as a fresh Linear4bit has it
        layer.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    with torch.no_grad():
        model(*batch)
    assert disable_cpu_4bit_packing(model) == len(layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    with torch.no_grad():
        # Packing stored the block scales in bf16 (bitsandbytes' inverse is best-effort): nearly, not bit, exact.
        torch.testing.assert_close(model(*batch).logits, expected, rtol=0, atol=1e-2)


@pytest.fixture(scope="module")
def trained_adapter(base_dir, batch, tmp_path_factory):
    """A LoRA teacher after one optimizer step (so B is non-zero), saved; returns (model, its logits, path)."""
    torch.manual_seed(0)
    model = load_teacher(base_dir, adapter=lora(), trainable_adapter=True)
    model(*batch).logits.log_softmax(-1)[..., 5].mean().neg().backward()
    torch.optim.SGD(trainable_parameters(model), lr=1.0).step()
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(*batch).logits
    return model, logits, path


def test_saved_adapter_loads_trainable_or_frozen(base_dir, batch, trained_adapter):
    _, logits, path = trained_adapter
    trainable = load_teacher(base_dir, adapter=path, trainable_adapter=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert len(names) == 8 and all("lora_" in n for n in names)
    frozen = load_teacher(base_dir, adapter=path)
    assert isinstance(frozen, PeftModel) and trainable_parameters(frozen) == [] and not frozen.training
    with torch.no_grad():
        for model in (trainable, frozen):
            torch.testing.assert_close(model(*batch).logits, logits, rtol=0, atol=0)
        # The same adapter on the 4-bit base: it applies (close to the fp32 result, unlike the bare 4-bit base).
        quantized = load_teacher(base_dir, quantization="4bit", adapter=path)
        assert_roughly_equal(quantized(*batch).logits, logits)


def test_adapter_disabled_gives_base_model(batch, fp32_logits, trained_adapter):
    model, logits, _ = trained_adapter
    assert (logits - fp32_logits).abs().max() > 1e-3  # the trained adapter does change the output
    with torch.no_grad():
        with adapter_disabled(model):
            torch.testing.assert_close(model(*batch).logits, fp32_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(*batch).logits, logits, rtol=0, atol=0)  # back on afterwards
        plain = tiny_llama()
        with adapter_disabled(plain):  # no-op for a model without adapters
            plain(*batch)


# ----------------------------------------------------------------------------------------------- hidden states
@pytest.mark.parametrize("case", ["plain", "lora", "lora_disabled", "4bit_lora"])
def test_backbone_hidden_states_times_head_equals_logits(base_dir, batch, case):
    torch.manual_seed(0)
    adapter = None if case == "plain" else lora(init_lora_weights=False)  # a non-trivial adapter
    model = load_teacher(base_dir, quantization="4bit" if case.startswith("4bit") else None, adapter=adapter)
    head = output_head(model)
    head_calls = []
    hook = head.register_forward_hook(lambda *args: head_calls.append(1))
    with torch.no_grad(), adapter_disabled(model) if case == "lora_disabled" else nullcontext():
        hidden = backbone_hidden_states(model, *batch)
        assert head_calls == []  # the full logits are never computed
        logits = model(*batch).logits
    hook.remove()
    assert hidden.shape == (*batch[0].shape, 64)
    from_hidden = hidden @ head.weight.T + (0 if head.bias is None else head.bias)
    torch.testing.assert_close(from_hidden, logits, rtol=1e-5, atol=1e-5)


def test_backbone_hidden_states_lora_enabled_differs_from_disabled(base_dir, batch):
    torch.manual_seed(0)
    model = load_teacher(base_dir, adapter=lora(init_lora_weights=False))
    with torch.no_grad():
        on = backbone_hidden_states(model, *batch)
        with adapter_disabled(model):
            off = backbone_hidden_states(model, *batch)
    assert (on - off).abs().max() > 1e-3


def test_output_head_and_backbone_refuse_what_they_cannot_represent(batch):
    with_head_lora = get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(NotImplementedError, match="output head"):
        output_head(with_head_lora)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        backbone_hidden_states(capped, *batch)


# ----------------------------------------------------------------------------------------------- vocabulary
def test_vocab_same_tokenizer_and_padded_heads():
    student_tok, teacher_tok = char_tokenizer(), char_tokenizer()
    assert check_vocab_compatible(student_tok, teacher_tok) == len(student_tok) == 20
    student, teacher = tiny_llama(vocab_size=32), tiny_llama(vocab_size=48)
    columns = check_vocab_compatible(student_tok, teacher_tok, student_model=student, teacher_model=teacher)
    assert columns == 32  # min of the head rows, each padded past the 20-token tokenizer
    assert check_vocab_compatible(student_tok, None, student_model=teacher, teacher_model=student) == 32
    # A PEFT-wrapped model's head is found through the wrapper.
    wrapped = get_peft_model(tiny_llama(vocab_size=40), lora())
    assert check_vocab_compatible(student_tok, student_model=wrapped, teacher_model=teacher) == 40


def test_vocab_different_tokenizers_raise_with_both_names():
    with pytest.raises(ValueError) as error:
        check_vocab_compatible(
            char_tokenizer(),
            char_tokenizer("0123456789+= abce"),
            student_name="tiny-student",
            teacher_name="big-teacher",
        )
    message = str(error.value)
    assert "tiny-student" in message and "big-teacher" in message
    assert "'d'" in message and "'e'" in message  # the tokens that differ


def test_vocab_head_smaller_than_tokenizer_raises():
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="big-teacher.*16 rows.*20 tokens"):
        check_vocab_compatible(
            tokenizer, tokenizer, student_model=tiny_llama(32), teacher_model=tiny_llama(16), teacher_name="big-teacher"
        )


def test_vocab_without_tokenizers_compares_heads():
    assert check_vocab_compatible(None, student_model=tiny_llama(32), teacher_model=tiny_llama(32)) == 32
    with pytest.raises(ValueError, match="s-model.*t-model"):
        check_vocab_compatible(
            None,
            student_model=tiny_llama(32),
            teacher_model=tiny_llama(48),
            student_name="s-model",
            teacher_name="t-model",
        )


def test_mass_beyond_columns_matches_the_softmax():
    wide = tiny_llama(vocab_size=48)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding positions are not measured
    mass = mass_beyond_columns(wide, ids, mask, 32, chunk_size=3)
    with torch.no_grad():
        probs = wide(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    expected = probs[..., 32:].sum(-1)[mask.bool()]
    torch.testing.assert_close(mass, expected, rtol=1e-4, atol=1e-6)
    assert mass.min() > 0.1  # a random head spreads its mass over every row


def test_load_tokenizer_returns_none_without_saved_files(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model-only")
    assert load_tokenizer(tmp_path / "model-only") is None
    char_tokenizer().save_pretrained(tmp_path / "with-tokenizer")
    assert load_tokenizer(tmp_path / "with-tokenizer").get_vocab() == char_tokenizer().get_vocab()
