"""OKDTrainer: losses against a hand-computed reference, what trains and what stays frozen, accumulation, resume,
save/reload, 4-bit teacher, dataset formats, a LoRA student and config errors."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_distill import losses
from trl_distill.addition import sft_dataset
from trl_distill.teacher import load_teacher
from trl_distill.trainers.okd import OKDConfig, OKDTrainer

from .conftest import cpu_args


def _okd(tmp_path, student, teacher, tokenizer, problems, format="messages", eval_dataset=None, **config):
    # No LoRA dropout unless a test asks: the references below are deterministic.
    config = {**cpu_args(), "teacher_lora_dropout": 0.0, "teacher_lora_r": 8, "teacher_lora_alpha": 16, **config}
    return OKDTrainer(
        model=student,
        teacher_model=teacher,
        args=OKDConfig(output_dir=str(tmp_path / "okd"), **config),
        train_dataset=sft_dataset(problems, format=format),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def _batch(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _adapter(trainer):
    return {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters() if "lora_" in n}


def _frozen_teacher_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters() if "lora_" not in n}


def _randomize_adapter(trainer, seed=0):
    # A fresh LoRA has B = 0, so its A gets no gradient and the adapter changes nothing: make both sides live.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainer.teacher_parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def _reference_losses(trainer, batch, alpha):
    """OKD's two losses from full logits, written out by hand."""
    student, teacher = trainer.model, trainer.teacher_model
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_q = F.log_softmax(student_logits[mask].float(), -1)  # student
    log_p = F.log_softmax(teacher_logits[mask].float(), -1)  # teacher + online module
    # L_S = KL(p_teacher || q_student), teacher constant
    student_loss = (log_p.detach().exp() * (log_p.detach() - log_q)).sum(-1).mean()
    # L_T = alpha * KL(q_student || p_teacher) + (1 - alpha) * CE(p_teacher, y), student constant
    teacher_kd = (log_q.detach().exp() * (log_q.detach() - log_p)).sum(-1).mean()
    teacher_ce = F.nll_loss(log_p, labels[mask])
    return student_loss, teacher_kd, teacher_ce, alpha * teacher_kd + (1 - alpha) * teacher_ce


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_losses_and_gradients_match_hand_computed_reference(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems, alpha=0.3, loss_chunk_size=7)
    _randomize_adapter(trainer)
    batch = _batch(trainer)

    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    got_student, got_teacher = _grads(trainer.model), _grads(trainer.teacher_model)
    trainer.model.zero_grad()
    trainer.teacher_model.zero_grad()

    student_loss, teacher_kd, teacher_ce, teacher_loss = _reference_losses(trainer, batch, alpha=0.3)
    torch.testing.assert_close(loss, student_loss + teacher_loss, rtol=1e-5, atol=1e-6)
    metrics = trainer._metrics["train"]
    torch.testing.assert_close(metrics["loss/student"][-1], student_loss.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss/teacher_kd"][-1], teacher_kd.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss/teacher_ce"][-1], teacher_ce.item(), rtol=1e-5, atol=1e-6)

    # Each loss reaches only its own model: L_S the student, L_T the teacher's adapter.
    student_loss.backward()
    teacher_loss.backward()
    want_student, want_teacher = _grads(trainer.model), _grads(trainer.teacher_model)
    assert got_student.keys() == want_student.keys() and len(got_student) > 0
    assert got_teacher.keys() == want_teacher.keys() and all("lora_" in n for n in got_teacher)
    for name in want_student:
        torch.testing.assert_close(got_student[name], want_student[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in want_teacher:
        torch.testing.assert_close(got_teacher[name], want_teacher[name], rtol=1e-4, atol=1e-6, msg=name)


def test_alpha_zero_gives_the_teacher_plain_cross_entropy_gradients(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems, alpha=0.0)
    _randomize_adapter(trainer)
    batch = _batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    got = _grads(trainer.teacher_model)
    trainer.teacher_model.zero_grad()

    # The model's own (shifted, mean over completion tokens) language-modeling loss.
    trainer.teacher_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    want = _grads(trainer.teacher_model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_two_optimizers_hold_disjoint_parameter_sets(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems, max_steps=1)
    trainer.train()
    in_optimizer = lambda optimizer: {id(p) for group in optimizer.param_groups for p in group["params"]}  # noqa: E731
    assert in_optimizer(trainer.optimizer) == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_optimizer(trainer.teacher_optimizer) == {id(p) for _, p in trainer.teacher_parameters}
    assert not in_optimizer(trainer.optimizer) & in_optimizer(trainer.teacher_optimizer)


def test_training_updates_the_adapter_never_the_teacher_base(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems, max_steps=3, learning_rate=1e-2,
                   eval_dataset=sft_dataset(problems[:8]))
    base, adapter = _frozen_teacher_weights(trainer), _adapter(trainer)
    student_before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()

    for name, value in _frozen_teacher_weights(trainer).items():
        assert torch.equal(value, base[name]), f"teacher base weight {name} changed"
    assert any(not torch.equal(value, adapter[name]) for name, value in _adapter(trainer).items())
    assert any(not torch.equal(v, student_before[k]) for k, v in trainer.model.state_dict().items())
    logged = {key for entry in trainer.state.log_history for key in entry}
    for key in ("loss/student", "loss/teacher_kd", "loss/teacher_ce", "mean_token_accuracy",
                "teacher_token_accuracy", "teacher_grad_norm", "teacher_learning_rate"):
        assert key in logged, key
    assert trainer.teacher_optimizer.param_groups[0]["lr"] >= 0
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_loss/student", "eval_loss/teacher_kd", "eval_teacher_token_accuracy"):
        assert key in metrics, key


def test_frozen_teacher_is_plain_kd(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems, teacher_update="frozen", max_steps=2)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    expected = losses.forward_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask=mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    weights = copy.deepcopy(trainer.teacher_model.state_dict())
    trainer.train()
    assert trainer.teacher_optimizer is None and trainer.teacher_parameters == []
    for name, value in trainer.teacher_model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_gradient_accumulation_2x4_equals_batch_8(tmp_path, student, teacher, tokenizer, problems):
    final = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        trainer = _okd(
            tmp_path / f"b{batch_size}", copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, problems,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            optim="sgd", learning_rate=0.1, max_steps=2, alpha=0.3,
        )
        trainer.train()
        final.append(({**trainer.model.state_dict()}, _adapter(trainer)))
    (student_a, adapter_a), (student_b, adapter_b) = final
    for name in student_a:
        torch.testing.assert_close(student_b[name], student_a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in adapter_a.items() if "lora_B" in n)
    for name in adapter_a:
        torch.testing.assert_close(adapter_b[name], adapter_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_resume_continues_exactly_and_save_model_writes_teacher_adapter(
    tmp_path, student, teacher, tokenizer, problems
):
    initial_student, initial_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    config = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2, teacher_learning_rate=3e-3,
                  lr_scheduler_type="cosine", warmup_steps=1)
    straight = _okd(tmp_path / "straight", student, teacher, tokenizer, problems, **config)
    straight.train()
    checkpoint = tmp_path / "straight" / "okd" / "checkpoint-2"
    for name in ("teacher_adapter/adapter_config.json", "teacher_optimizer.pt", "teacher_scheduler.pt"):
        assert (checkpoint / name).exists(), name

    resumed = _okd(tmp_path / "resumed", initial_student, initial_teacher, tokenizer, problems, **config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)
    for name, value in _adapter(straight).items():
        torch.testing.assert_close(_adapter(resumed)[name], value, msg=name)

    def late_losses(trainer):
        return [(e["step"], e["loss"], e["loss/teacher_kd"]) for e in trainer.state.log_history if "loss" in e][-2:]

    assert [s for s, *_ in late_losses(resumed)] == [3, 4]
    for (_, *a), (_, *b) in zip(late_losses(straight), late_losses(resumed)):
        torch.testing.assert_close(b, a)

    # save_model: the student as usual, the teacher adapter beside it; both reload to the trained models.
    out = tmp_path / "saved"
    straight.save_model(str(out))
    assert (out / "config.json").exists() and (out / "teacher_adapter" / "adapter_config.json").exists()
    batch = _batch(straight)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        reloaded_student = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(reloaded_student(**inputs).logits, straight.model(**inputs).logits)
        base = copy.deepcopy(straight.teacher_model).unload()  # the base never changed; drop the trained adapter
        reloaded_teacher = load_teacher(base, adapter=str(out / "teacher_adapter"))
        torch.testing.assert_close(reloaded_teacher(**inputs).logits, straight.teacher_model(**inputs).logits)


def test_4bit_teacher_on_cpu(tmp_path, student, teacher, tokenizer, problems):
    pytest.importorskip("bitsandbytes")
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    trainer = _okd(
        tmp_path, student, str(tmp_path / "teacher"), tokenizer, problems, teacher_quantization="4bit",
        max_steps=2, learning_rate=1e-2,
    )
    base, adapter = _frozen_teacher_weights(trainer), _adapter(trainer)
    assert any(p.dtype == torch.uint8 for p in trainer.teacher_model.parameters())  # nf4-packed weights
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    for name, value in _frozen_teacher_weights(trainer).items():
        assert torch.equal(value, base[name]), name
    assert any(not torch.equal(value, adapter[name]) for name, value in _adapter(trainer).items())


@pytest.mark.parametrize("format", ["prompt_completion", "language_modeling"])
def test_dataset_formats_and_lora_student(tmp_path, student, teacher, tokenizer, problems, format):
    trainer = OKDTrainer(
        model=student,
        teacher_model=teacher,
        args=OKDConfig(output_dir=str(tmp_path), **cpu_args(max_steps=1), teacher_lora_r=4, loss_type="jsd"),
        train_dataset=sft_dataset(problems, format=format),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert trainer.state.log_history[0]["loss/student"] > 0


def test_every_divergence_is_a_student_loss(tmp_path, student, teacher, tokenizer, problems):
    trainer = _okd(tmp_path, student, teacher, tokenizer, problems)
    batch = _batch(trainer, 4)
    for loss_type in losses.LOSS_TYPES:
        trainer.args.loss_type = loss_type  # one trainer for all: the loss reads the field at every step
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        assert torch.isfinite(loss), loss_type
        assert trainer.model.lm_head.weight.grad.abs().sum() > 0, loss_type


@pytest.mark.parametrize(
    "field, value",
    [("alpha", 1.5), ("teacher_update", "sometimes"), ("loss_type", "kl"), ("teacher_quantization", "8bit"),
     ("loss_chunk_size", 0), ("padding_free", True)],
)
def test_config_errors_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field if field != "padding_free" else "padding-free"):
        OKDConfig(output_dir=str(tmp_path), **cpu_args(), **{field: value})


def test_teacher_adapter_from_a_previous_run_is_trained_further(tmp_path, student, teacher, tokenizer, problems):
    first = _okd(tmp_path / "a", copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, problems, max_steps=1,
                 learning_rate=1e-2)
    first.train()
    first.save_model(str(tmp_path / "first"))
    second = _okd(tmp_path / "b", student, teacher, tokenizer, problems,
                  teacher_adapter=str(tmp_path / "first" / "teacher_adapter"))
    for name, value in _adapter(first).items():
        torch.testing.assert_close(_adapter(second)[name], value, msg=name)
    assert second.teacher_parameters, "a loaded adapter must be trainable in online mode"
    assert os.path.isdir(tmp_path / "first" / "teacher_adapter")
