"""ADPOTrainer: equals TRL's sigmoid DPO on pairs, listwise targets and collation, moving anchors, reward functions."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.rewards import get_soft_overlong_punishment, think_format_reward

from trl_distill import addition
from trl_distill.testing import pad_output_head, tiny_causal_lm
from trl_distill.trainers.adpo import (
    ANCHOR_WEIGHTS_NAME,
    ADPOConfig,
    ADPOTrainer,
    group_by_prompt,
    listwise_loss,
    listwise_target,
)

from .conftest import assert_accumulation_equals_one_batch, cpu_args

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _adpo(model, tokenizer, dataset, tmp_path, ref_model=None, peft_config=None, callbacks=None, **overrides):
    return ADPOTrainer(
        model=model,
        ref_model=ref_model,
        args=ADPOConfig(output_dir=str(tmp_path), **cpu_args(**overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ pairs = DPO


def test_pairs_with_hard_target_equal_trl_sigmoid_dpo(student, tokenizer, problems, tmp_path):
    beta = 0.5
    reference = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=7)
    dataset = addition.preference_dataset(problems[:8])
    policy_dpo, policy_adpo = copy.deepcopy(student), copy.deepcopy(student)
    dpo = DPOTrainer(
        model=policy_dpo,
        ref_model=copy.deepcopy(reference),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), beta=beta, **cpu_args()),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    adpo = _adpo(policy_adpo, tokenizer, dataset, tmp_path / "adpo", ref_model=copy.deepcopy(reference), tau=1 / beta)

    dpo_loss = dpo.compute_loss(dpo.model, _batch(dpo, 8))
    adpo_loss = adpo.compute_loss(adpo.model, _batch(adpo, 8))
    torch.testing.assert_close(adpo_loss, dpo_loss, rtol=1e-6, atol=1e-7)
    dpo_loss.backward()
    adpo_loss.backward()
    dpo_grads, adpo_grads = _grads(policy_dpo), _grads(policy_adpo)
    assert dpo_grads.keys() == adpo_grads.keys() and dpo_grads
    for name in dpo_grads:
        torch.testing.assert_close(adpo_grads[name], dpo_grads[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ target, loss


def test_listwise_target_and_loss_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 2.0], [3.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    q = listwise_target(rewards, valid, beta_r=0.5, scale_rewards="group")
    r = torch.tensor([1.0, 0.0, 0.0, 2.0])
    z = (r - r.mean()) / (r.std() + 1e-4)  # unbiased std, as TRL's GRPO
    torch.testing.assert_close(q[0], torch.softmax(z / 0.5, 0))
    z2 = torch.tensor([1.0, -1.0]) / (torch.tensor([3.0, 1.0]).std() + 1e-4)
    torch.testing.assert_close(q[1, :2], torch.softmax(z2 / 0.5, 0))
    assert torch.equal(q[1, 2:], torch.zeros(2))  # padding slots get no mass

    q_none = listwise_target(rewards, valid, beta_r=2.0, scale_rewards="none")
    torch.testing.assert_close(q_none[0], torch.softmax((r - r.mean()) / 2.0, 0))

    hard = listwise_target(rewards, valid, hard_target=torch.tensor([True, False]))
    assert torch.equal(hard[0], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(hard[1], q[1])

    scores = torch.tensor([[0.1, -0.3, 0.2, 0.5], [1.0, -1.0, 99.0, 99.0]], requires_grad=True)
    loss = listwise_loss(scores, q, valid)
    expected0 = -(q[0] * torch.log_softmax(scores[0].detach(), 0)).sum()
    expected1 = -(q[1, :2] * torch.log_softmax(scores[1, :2].detach(), 0)).sum()
    torch.testing.assert_close(loss.detach(), torch.stack([expected0, expected1]))
    loss.sum().backward()
    assert torch.equal(scores.grad[1, 2:], torch.zeros(2)) and torch.isfinite(scores.grad).all()


def test_group_by_prompt():
    values = torch.arange(5.0)
    grouped, valid = group_by_prompt(values, torch.tensor([2, 3]), fill=-1.0)
    assert torch.equal(grouped, torch.tensor([[0.0, 1.0, -1.0], [2.0, 3.0, 4.0]]))
    assert torch.equal(valid, torch.tensor([[True, True, False], [True, True, True]]))


# ------------------------------------------------------------------------------------------------ listwise data


def test_variable_k_collation_and_per_prompt_loss(student, tokenizer, problems, tmp_path):
    rows = addition.listwise_dataset(problems[:3], k=4).to_list()
    rows[0]["completions"], rows[0]["rewards"] = rows[0]["completions"][:2], rows[0]["rewards"][:2]
    rows[1]["completions"], rows[1]["rewards"] = rows[1]["completions"][:3], rows[1]["rewards"][:3]
    if max(rows[0]["rewards"]) == min(rows[0]["rewards"]):  # make sure the K=2 row has a preference
        rows[0]["rewards"] = [1.0, 0.0]
    trainer = _adpo(student, tokenizer, Dataset.from_list(rows), tmp_path, ref_model=copy.deepcopy(student))
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)

    assert batch["completion_counts"].tolist() == [2, 3, 4]
    assert batch["input_ids"].shape[0] == 9
    assert batch["rewards"].tolist() == [r for row in rows for r in row["rewards"]]
    flat = [(e["prompt_ids"], c) for e in examples for c in e["completion_ids"]]
    for i, (prompt, completion) in enumerate(flat):
        n = len(prompt) + len(completion)
        assert batch["input_ids"][i, :n].tolist() == prompt + completion
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["completion_mask"][i].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
            batch["input_ids"].shape[1] - n
        )

    # Move the policy away from the anchor so scores are not all zero, then: the batch loss is the mean of the
    # per-prompt losses, so padding completions (the missing slots of short rows) contribute nothing.
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        joint = trainer.compute_loss(trainer.model, batch)
        alone = [trainer.compute_loss(trainer.model, trainer.data_collator([e])) for e in examples]
    assert joint.item() > 0
    torch.testing.assert_close(joint, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)


def test_trl_reward_functions_flow_into_target(student, tokenizer, problems, tmp_path):
    base = addition.listwise_dataset(problems[:4], k=3).remove_columns("rewards")
    # think_format_reward reads conversational completions, the overlong punishment their token ids.
    rows = base.to_list()
    for row in rows:
        row["completions"][0] = [{"role": "assistant", "content": "<think>1</think>" + row["answer"]}]
    dataset = Dataset.from_list(rows)
    overlong = get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=4)
    trainer = ADPOTrainer(
        model=student,
        ref_model=copy.deepcopy(student),
        args=ADPOConfig(output_dir=str(tmp_path), reward_weights=[1.0, 2.0, 0.5], **cpu_args()),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[addition.reward_exact_match, think_format_reward, overlong],
    )
    prepared = trainer.train_dataset
    for row, prepared_row in zip(rows, prepared, strict=True):
        exact = addition.reward_exact_match(row["completions"], [row["answer"]] * 3)
        think = think_format_reward(row["completions"])
        length = overlong(completion_ids=prepared_row["completion_ids"])
        expected = [e + 2.0 * t + 0.5 * o for e, t, o in zip(exact, think, length, strict=True)]
        assert prepared_row["rewards"] == pytest.approx(expected)
    assert any(r != 0 for row in prepared["rewards"] for r in row[1:])  # the functions did score something

    # The loss uses exactly these rewards: same as a dataset that carries them as a column.
    with_column = dataset.add_column("rewards", prepared["rewards"])
    explicit = _adpo(copy.deepcopy(student), tokenizer, with_column, tmp_path / "x", ref_model=copy.deepcopy(student))
    batch = _batch(trainer, 4)
    assert torch.equal(batch["rewards"], _batch(explicit, 4)["rewards"])
    with torch.no_grad():
        for model in (trainer.model, explicit.model):
            torch.manual_seed(0)
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.testing.assert_close(
            trainer.compute_loss(trainer.model, batch), explicit.compute_loss(explicit.model, _batch(explicit, 4))
        )


def test_reward_functions_and_rewards_column_are_exclusive(student, tokenizer, problems, tmp_path):
    with pytest.raises(ValueError, match="rewards"):
        ADPOTrainer(
            model=student,
            args=ADPOConfig(output_dir=str(tmp_path), **cpu_args()),
            train_dataset=addition.listwise_dataset(problems[:2], k=2),
            processing_class=tokenizer,
            reward_funcs=addition.reward_exact_match,
        )


# ------------------------------------------------------------------------------------------------ anchors


class _Recorder(TrainerCallback):
    """Runs before the trainer's own anchor update: records (policy, anchor) right after each optimizer step."""

    def __init__(self, read):
        self.read, self.records = read, []

    def on_step_end(self, args, state, control, **kwargs):
        self.records.append(self.read())


def _lora_weights(model, adapter):
    return {n.replace(f".{adapter}.", "."): p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_ema_anchor_of_lora_policy_follows_update_rule(student, tokenizer, problems, tmp_path):
    decay = 0.6
    recorder = _Recorder(lambda: None)
    trainer = _adpo(
        student, tokenizer, addition.listwise_dataset(problems[:16], k=4), tmp_path, peft_config=LoraConfig(**LORA),
        anchor="ema", ema_decay=decay, max_steps=3, learning_rate=2e-2, gradient_accumulation_steps=2,
        per_device_train_batch_size=4, callbacks=[recorder],
    )
    model = trainer.model
    recorder.read = lambda: (_lora_weights(model, "default"), _lora_weights(model, "ref"))
    anchor_0 = _lora_weights(model, "ref")
    assert anchor_0.keys() == _lora_weights(model, "default").keys() and anchor_0
    assert all(torch.equal(anchor_0[n], w) for n, w in _lora_weights(model, "default").items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)

    trainer.train()
    anchors = [r[1] for r in recorder.records] + [_lora_weights(model, "ref")]
    for step, (policy, _) in enumerate(recorder.records):
        for name in policy:
            expected = decay * anchors[step][name] + (1 - decay) * policy[name]
            torch.testing.assert_close(anchors[step + 1][name], expected)
    assert any(not torch.equal(anchors[-1][n], anchor_0[n]) for n in anchor_0)
    assert trainer.ref_model is None  # the anchor is an adapter, not a second model


def test_periodic_anchor_of_full_model(student, tokenizer, problems, tmp_path):
    recorder = _Recorder(lambda: None)
    trainer = _adpo(
        student, tokenizer, addition.preference_dataset(problems[:16]), tmp_path, anchor="periodic",
        anchor_refresh_steps=2, max_steps=3, learning_rate=1e-2, callbacks=[recorder],
    )
    snapshot = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    recorder.read = lambda: (snapshot(trainer.model), snapshot(trainer.ref_model))
    initial = snapshot(trainer.ref_model)
    trainer.train()
    (policy_1, anchor_1), (policy_2, anchor_2), (policy_3, anchor_3) = recorder.records
    assert all(torch.equal(a, b) for a, b in zip(anchor_1, initial))  # before any refresh
    assert all(torch.equal(a, b) for a, b in zip(anchor_2, initial))  # step 1 is not a refresh step
    assert all(torch.equal(a, b) for a, b in zip(anchor_3, policy_2))  # refreshed after step 2
    final = snapshot(trainer.ref_model)
    assert all(torch.equal(a, b) for a, b in zip(final, anchor_3))  # step 3 is not a refresh step
    assert not all(torch.equal(a, b) for a, b in zip(final, initial))


def test_resume_without_the_anchor_file_warns_and_restarts_the_anchor(student, tokenizer, problems, tmp_path, caplog):
    dataset = addition.preference_dataset(problems[:16])
    initial = copy.deepcopy(student)
    first = _adpo(copy.deepcopy(initial), tokenizer, dataset, tmp_path, anchor="ema", ema_decay=0.5, max_steps=2,
                  learning_rate=1e-2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved_anchor = [p.detach().clone() for p in first.ref_model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(saved_anchor, initial.parameters()))  # the anchor had moved
    (checkpoint / ANCHOR_WEIGHTS_NAME).unlink()  # e.g. a checkpoint written with save_only_model

    resumed = _adpo(copy.deepcopy(initial), tokenizer, dataset, tmp_path, anchor="ema", ema_decay=0.5, max_steps=2,
                    learning_rate=1e-2)
    resumed._load_from_checkpoint(str(checkpoint))  # the policy (Trainer's hook; skipped under DeepSpeed)
    with caplog.at_level("WARNING", logger="trl_distill"):
        resumed._load_extra_state(str(checkpoint))  # the anchor (called on every resume path)
    assert f"checkpoint-2 has no {ANCHOR_WEIGHTS_NAME}: the ema anchor restarts" in caplog.text
    for anchor, start in zip(resumed.ref_model.parameters(), initial.parameters(), strict=True):
        torch.testing.assert_close(anchor, start, rtol=0, atol=0)  # the anchor as built, not the saved one
    for policy, trained in zip(resumed.model.parameters(), first.model.parameters(), strict=True):
        torch.testing.assert_close(policy, trained, rtol=0, atol=0)  # the policy itself was restored


def test_teacher_anchor_with_padded_head(student, tokenizer, problems, tmp_path):
    # A teacher head padded past the tokenizer (as real checkpoints, whose padding rows carry ~0 mass): the anchor
    # normalises over the shared columns. (A head whose extra rows carry real mass stops training: test_bad_input.)
    teacher = pad_output_head(tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1),
                              len(tokenizer) + 13)
    trainer = ADPOTrainer(
        model=student,
        teacher_model=teacher,
        args=ADPOConfig(output_dir=str(tmp_path), anchor="teacher", anchor_kl_coef=0.1, **cpu_args()),
        train_dataset=addition.listwise_dataset(problems[:8], k=4),
        processing_class=tokenizer,
    )
    assert trainer.accelerator.unwrap_model(trainer.ref_model) is teacher
    batch = _batch(trainer, 2)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    anchor = trainer._anchor_token_logps(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, labels, labels.shape[1] - 1
    )
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.log_softmax(logits[..., : len(tokenizer)], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = expected * batch["completion_mask"][:, 1:]
    torch.testing.assert_close(anchor, expected, rtol=1e-5, atol=1e-5)
    trainer.train()
    kl = [log["anchor_kl"] for log in trainer.state.log_history if "anchor_kl" in log]
    assert kl and all(math.isfinite(v) and v > 0 for v in kl)


# ------------------------------------------------------------------------------------------------ config


def test_config_validation(tmp_path):
    for field, value in [("tau", 0.0), ("beta_r", -1.0), ("anchor", "moving"), ("ema_decay", 1.0),
                         ("scale_rewards", "batch"), ("anchor_refresh_steps", 0), ("loss_type", "ipo")]:
        with pytest.raises(ValueError, match=f"ADPOConfig.{field}"):
            ADPOConfig(output_dir=str(tmp_path), **cpu_args(**{field: value}))


def test_4bit_teacher_anchor_with_lora_policy(student, teacher, tokenizer, problems, tmp_path):
    trainer = ADPOTrainer(
        model=student,
        teacher_model=teacher,
        args=ADPOConfig(output_dir=str(tmp_path), anchor="teacher", teacher_quantization="4bit", **cpu_args()),
        train_dataset=addition.listwise_dataset(problems[:8], k=3),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    assert getattr(trainer.accelerator.unwrap_model(trainer.ref_model), "is_loaded_in_4bit", False)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "adpo/loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["adpo/loss"]) and log["anchor_kl"] > 0 for log in logs)


def test_anchor_kl_accumulates_like_one_batch(student, tokenizer, problems, tmp_path, monkeypatch):
    # anchor_kl is a token loss: divided by the completion tokens of the whole step, so 2 x 4 equals 8 even though
    # the answers (1 to 3 digits) give the micro-batches different token counts. The anchor must differ from the
    # policy: at anchor == policy the k3 estimate and its gradient are both 0.
    dataset = addition.preference_dataset(problems[:16])
    anchor = copy.deepcopy(student)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in anchor.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    overrides = dict(anchor="fixed", ref_model=anchor, anchor_kl_coef=5.0)
    assert_accumulation_equals_one_batch(
        student,
        lambda model, name, **args: _adpo(model, tokenizer, dataset, tmp_path / name, **args, **overrides),
        ADPOTrainer,
        monkeypatch,
    )
