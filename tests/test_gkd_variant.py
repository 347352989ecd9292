"""GKDVariant: equivalence with TRL's GKDTrainer, every divergence trains, accumulation, LoRA, 4-bit, errors."""

import copy

import pytest
import torch
from peft import LoraConfig
from trl.experimental.gkd import GKDConfig, GKDTrainer

from trl_distill import GKDVariant, GKDVariantConfig, losses
from trl_distill.addition import sft_dataset

from .conftest import cpu_args


def _variant(tmp_path, student, teacher, tokenizer, problems, **config):
    config = {**cpu_args(), "lmbda": 0.0, **config}
    return GKDVariant(
        model=student,
        teacher_model=teacher,
        args=GKDVariantConfig(output_dir=str(tmp_path / "variant"), **config),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
    )


def _batch(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _loss_and_grads(trainer, batch, num_items=None):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size", [3, None])
def test_defaults_equal_trl_gkd_loss_and_grads(tmp_path, student, teacher, tokenizer, problems, chunk_size):
    trl_trainer = GKDTrainer(
        model=copy.deepcopy(student),
        teacher_model=copy.deepcopy(teacher),
        args=GKDConfig(output_dir=str(tmp_path / "trl"), lmbda=0.0, **cpu_args()),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
    )
    ours = _variant(tmp_path, student, teacher, tokenizer, problems, loss_chunk_size=chunk_size)
    batch = _batch(ours)
    for num_items in (None, torch.tensor(50)):
        expected, expected_grads = _loss_and_grads(trl_trainer, batch, num_items)
        got, got_grads = _loss_and_grads(ours, batch, num_items)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert expected_grads.keys() == got_grads.keys()
        for name in expected_grads:
            torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_top_k_equal_to_vocab_matches_dense_in_trainer(tmp_path, student, teacher, tokenizer, problems):
    dense = _variant(tmp_path, copy.deepcopy(student), teacher, tokenizer, problems, loss_type="forward_kl")
    top_k = _variant(
        tmp_path, student, teacher, tokenizer, problems, loss_type="forward_kl", teacher_top_k=len(tokenizer)
    )
    batch = _batch(dense)
    torch.testing.assert_close(_loss_and_grads(top_k, batch)[0], _loss_and_grads(dense, batch)[0])


def test_accumulated_micro_batches_equal_full_batch(tmp_path, student, teacher, tokenizer, problems):
    """Two micro-batches normalised by the full batch's token count sum to the full batch's loss and gradients."""
    trainer = _variant(tmp_path, student, teacher, tokenizer, problems, loss_type="skew_kl")
    batch = _batch(trainer, 8)
    num_items = (batch["labels"][:, 1:] != -100).sum()
    full_loss, full_grads = _loss_and_grads(trainer, batch)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]
    parts = [_loss_and_grads(trainer, half, num_items) for half in halves]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss)
    for name, grad in full_grads.items():
        torch.testing.assert_close(parts[0][1][name] + parts[1][1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_every_divergence_trains_and_logs(tmp_path, student, teacher, tokenizer, problems, loss_type):
    trainer = _variant(tmp_path, student, teacher, tokenizer, problems, loss_type=loss_type, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    for key in ("divergence", "teacher_agreement", "on_policy_fraction"):
        assert key in logs[0], key
    assert 0.0 <= logs[0]["teacher_agreement"] <= 1.0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_on_policy_generation_is_used_and_logged(tmp_path, student, teacher, tokenizer, problems):
    trainer = _variant(tmp_path, student, teacher, tokenizer, problems, lmbda=1.0, max_new_tokens=4, max_steps=2)
    trainer.train()
    fractions = [entry["on_policy_fraction"] for entry in trainer.state.log_history if "on_policy_fraction" in entry]
    assert fractions == [1.0, 1.0]


def test_lora_student_trains_only_adapter(tmp_path, student, teacher, tokenizer, problems):
    config = {**cpu_args(), "lmbda": 0.0}
    trainer = GKDVariant(
        model=student,
        teacher_model=teacher,
        args=GKDVariantConfig(output_dir=str(tmp_path / "lora"), **config),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)


def test_4bit_teacher_from_path(tmp_path, student, teacher, tokenizer, problems):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    trainer = _variant(tmp_path, student, str(tmp_path / "teacher"), tokenizer, problems, teacher_quantization="4bit")
    assert getattr(trainer.teacher_model, "is_loaded_in_4bit", False)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_student_head_padded_larger_is_accepted(tmp_path, teacher, tokenizer, problems):
    from trl_distill.testing import tiny_causal_lm

    padded = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2, padded_vocab=64)
    assert padded.get_output_embeddings().weight.shape[0] > len(tokenizer)
    trainer = _variant(tmp_path, padded, teacher, tokenizer, problems)
    assert trainer.vocab_columns == teacher.get_output_embeddings().weight.shape[0]
    trainer.train()


def test_teacher_head_smaller_than_tokenizer_is_rejected(tmp_path, student, tokenizer, problems):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer) - 3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    )
    with pytest.raises(ValueError, match="teacher|LlamaForCausalLM"):
        _variant(tmp_path, student, small, tokenizer, problems)


@pytest.mark.parametrize(
    "field, value",
    [("loss_type", "kl"), ("skew_alpha", 1.0), ("akl_mu", 0.0), ("loss_temperature", 0.0),
     ("teacher_top_k", 0), ("teacher_quantization", "8bit"), ("beta", 1.5)],
)
def test_invalid_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        GKDVariantConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_missing_teacher_is_a_clear_error(tmp_path, student, tokenizer, problems):
    with pytest.raises(ValueError, match="teacher_model"):
        _variant(tmp_path, student, None, tokenizer, problems)


def test_qlora_student_keeps_gradients_through_on_policy_generation(tmp_path, student, teacher, tokenizer, problems):
    """Generation runs the 4-bit student without grad; bitsandbytes' packed CPU path must not eat later gradients."""
    from transformers import AutoModelForCausalLM

    from trl_distill.teacher import bnb_4bit_config

    student.save_pretrained(tmp_path / "student")
    qlora_student = AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", quantization_config=bnb_4bit_config("cpu"), device_map="cpu"
    )
    config = {**cpu_args(), "lmbda": 1.0, "max_new_tokens": 4}
    trainer = GKDVariant(
        model=qlora_student,
        teacher_model=teacher,
        args=GKDVariantConfig(output_dir=str(tmp_path / "qlora"), **config),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_a = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if n in lora_a and torch.equal(lora_a[n], p)]
    assert not unchanged, f"LoRA weights that never received a gradient: {unchanged}"


@pytest.mark.parametrize("chunk_size", [256, None])
def test_evaluation_logs_eval_loss_and_metrics(tmp_path, student, teacher, tokenizer, problems, chunk_size):
    trainer = GKDVariant(
        model=student,
        teacher_model=teacher,
        args=GKDVariantConfig(
            output_dir=str(tmp_path / "eval"), lmbda=0.0, loss_chunk_size=chunk_size,
            **cpu_args(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8),
        ),
        train_dataset=sft_dataset(problems, format="messages"),
        eval_dataset=sft_dataset(problems[:16], format="messages"),
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert 0.0 <= metrics["eval_teacher_agreement"] <= 1.0
