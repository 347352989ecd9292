"""REDITrainer: the reference-free loss by hand, alpha = 0 as normalized NLL, and no reference model anywhere."""

import pytest
import torch
from peft import LoraConfig

from trl_distill import addition
from trl_distill.trainers.redi import REDIConfig, REDITrainer, redi_loss

from .conftest import cpu_args


def _trainer(student, tokenizer, problems, tmp_path, peft_config=None, **overrides):
    return REDITrainer(
        model=student,
        args=REDIConfig(output_dir=str(tmp_path), **cpu_args(**overrides)),
        train_dataset=addition.preference_dataset(problems[:16]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _normalized_logps(model, batch):
    """Per-sequence mean log-prob of the completion tokens, from plain logits (independent of TRL's fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * mask).sum(1) / mask.sum(1)


def _fixed_batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_loss_matches_hand_computation(student, tokenizer, problems, tmp_path, alpha):
    trainer = _trainer(student, tokenizer, problems, tmp_path, alpha=alpha)
    batch = _fixed_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    chosen, rejected = _normalized_logps(student, batch).chunk(2)
    expected = (-chosen + alpha * rejected).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    if alpha == 0.0:  # length-normalized NLL on the chosen completions
        torch.testing.assert_close(loss, (-chosen).mean(), rtol=1e-5, atol=1e-6)


def test_redi_loss_function():
    per_pair, c, r = redi_loss(
        torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -1.0]), torch.tensor([2, 3]), torch.tensor([3, 0]), alpha=0.5
    )
    torch.testing.assert_close(c, torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(r, torch.tensor([-1.0, -1.0]))  # an empty completion counts as length 1
    torch.testing.assert_close(per_pair, torch.tensor([1.0 - 0.5, 2.0 - 0.5]))


def test_no_reference_model_and_one_forward_per_micro_batch(student, tokenizer, problems, tmp_path):
    calls = []
    student.register_forward_pre_hook(lambda module, args: calls.append(1))
    trainer = _trainer(
        student, tokenizer, problems, tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    assert trainer.ref_model is None
    # precompute_ref_log_probs=True is TRL's "no reference in memory"; the trainer then reads none
    assert trainer.args.precompute_ref_log_probs and not trainer.precompute_ref_logps
    assert calls == []  # nothing ran at init: no precomputation of any kind
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert len(calls) == 2 * 2  # 2 optimizer steps x 2 micro-batches, one policy forward each, nothing else
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    logs = [log for log in trainer.state.log_history if "logps/margin" in log]
    assert logs and all(
        abs(log["logps/margin"] - (log["logps/chosen_normalized"] - log["logps/rejected_normalized"])) < 1e-5
        for log in logs
    )
    with pytest.raises(RuntimeError, match="reference-free"):
        trainer.compute_ref_log_probs(trainer.model, _fixed_batch(trainer))
    # A new dataset evaluated after training (full fine-tuning): TRL refuses this when it would need a reference;
    # REDI needs none, so it evaluates, still with policy forwards only.
    calls.clear()
    metrics = trainer.evaluate(addition.preference_dataset(problems[16:20]))
    assert "eval_logps/margin" in metrics and len(calls) == 1


def test_lora_policy_trains_adapter_only_without_disabling_it(student, tokenizer, problems, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(student, tokenizer, problems, tmp_path, peft_config=lora, max_steps=2, learning_rate=1e-2)
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]

    def no_reference():  # TRL's PEFT reference is the adapter disabled: REDI must never ask for it
        raise AssertionError("REDI disabled the adapter (a reference forward)")

    model.disable_adapter = no_reference
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="REDIConfig.alpha"):
        REDIConfig(output_dir=str(tmp_path), alpha=-0.1, **cpu_args())
    with pytest.raises(ValueError, match="REDIConfig.loss_type"):
        REDIConfig(output_dir=str(tmp_path), loss_type="ipo", **cpu_args())
    with pytest.raises(ValueError, match="REDIConfig.precompute_ref_log_probs=False would make TRL load a reference"):
        REDIConfig(output_dir=str(tmp_path), precompute_ref_log_probs=False, **cpu_args())
    with pytest.raises(ValueError, match="REDIConfig.sync_ref_model"):
        REDIConfig(output_dir=str(tmp_path), sync_ref_model=True, **cpu_args())


def test_ref_model_rejected(student, teacher, tokenizer, problems, tmp_path):
    with pytest.raises(ValueError, match="reference-free"):
        REDITrainer(
            model=student,
            ref_model=teacher,
            args=REDIConfig(output_dir=str(tmp_path), **cpu_args()),
            train_dataset=addition.preference_dataset(problems[:4]),
            processing_class=tokenizer,
        )


def test_qlora_policy(tokenizer, problems, tmp_path):
    from trl_distill.teacher import load_teacher
    from trl_distill.testing import tiny_causal_lm

    # A 4-bit (nf4) base with a LoRA adapter: TRL's QLoRA path, still without any reference.
    base = load_teacher(tiny_causal_lm(tokenizer, 32, 1, 2, seed=2), quantization="4bit", name="student")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(base, tokenizer, problems, tmp_path, peft_config=lora, max_steps=2, learning_rate=1e-2)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.ref_model is None and trainable
    assert any(not torch.equal(trainable[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
