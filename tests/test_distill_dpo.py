"""DistillDPOTrainer: equality with TRL's DPOTrainer (teacher as ref_model), each term by hand, 4-bit, LoRA, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_distill.addition import preference_dataset
from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer, adpa_advantage_term

from .conftest import assert_accumulation_equals_one_batch, cpu_args

TOP_K = 5  # the task's vocabulary has 19 tokens: a top-k below it exercises the rest bucket


def _config(tmp_path, **overrides):
    return DistillDPOConfig(output_dir=str(tmp_path / "distill_dpo"), **{**cpu_args(), **overrides})


def _trainer(tmp_path, student, teacher, tokenizer, problems, **overrides):
    return DistillDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, **overrides),
        train_dataset=preference_dataset(problems[:16]),
        processing_class=tokenizer,
    )


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _lora_teacher(teacher):
    """A teacher whose adapter changes its outputs (random, non-zero LoRA B): adapter on != adapter off."""
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return get_peft_model(teacher, config)


def _hand_inputs(batch):
    """Positions predicting completion tokens, their targets and which rows are chosen (batch is [chosen; rejected])."""
    positions = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:][positions]
    half = batch["input_ids"].size(0) // 2
    rows = torch.arange(batch["input_ids"].size(0))[:, None].expand_as(positions)[positions]
    return positions, targets, rows < half


def _hand_topk_forward_kl(student_logits, teacher_logits, k):
    """KL(p || q) over the teacher's top-k tokens plus one rest bucket, mean over positions, in plain torch."""
    p = teacher_logits.double().softmax(-1)
    q = student_logits.double().softmax(-1)
    ids = p.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_all = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_all = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    return (p_all * (p_all.log() - q_all.log())).sum(-1).mean()


def _hand_sequence_logps(logits, batch, positions, targets):
    token_logps = logits.double().log_softmax(-1)[:, :-1][positions].gather(-1, targets[:, None])[:, 0]
    rows = torch.arange(logits.size(0))[:, None].expand_as(positions)[positions]
    return torch.zeros(logits.size(0), dtype=torch.float64).index_add(0, rows, token_logps)


# ----------------------------------------------------------------------------------------------------- config
def test_mode_defaults_follow_the_authors_recipes(tmp_path):
    ref = _config(tmp_path)
    assert (ref.dpo_weight, ref.sft_weight, ref.chosen_kd_weight, ref.rejected_kd_weight, ref.adpa_weight) == (
        1.0, 0.0, 0.0, 0.0, 0.0
    )
    dckd = _config(tmp_path, mode="dckd")
    assert (dckd.dpo_weight, dckd.sft_weight, dckd.chosen_kd_weight, dckd.rejected_kd_weight) == (0.0, 1.0, 0.1, 0.1)
    adpa = _config(tmp_path, mode="adpa")
    assert (adpa.dpo_weight, adpa.sft_weight, adpa.adpa_weight, adpa.teacher_top_k) == (0.0, 1.0, 1.6, 50)
    assert adpa.adpa_responses == "student" and adpa.advantage_clamp is None
    assert _config(tmp_path, mode="dckd", dpo_weight=0.5).dpo_weight == 0.5  # explicit values win


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"mode": "kd"}, "mode"),
        ({"mode": "dckd", "sft_weight": -1.0}, "sft_weight"),
        ({"dpo_weight": 0.0}, "loss weight"),
        ({"teacher_top_k": 0}, "teacher_top_k"),
        ({"adpa_responses": "chosen"}, "adpa_responses"),
        ({"advantage_clamp": [1.0, 0.0]}, "advantage_clamp"),
        ({"teacher_quantization": "8bit"}, "teacher_quantization"),
        ({"sync_ref_model": True}, "sync_ref_model"),
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        _config(tmp_path, **overrides)


def test_trainer_errors(tmp_path, student, teacher, tokenizer, problems):
    with pytest.raises(ValueError, match="teacher_model"):
        _trainer(tmp_path, student, None, tokenizer, problems)
    with pytest.raises(ValueError, match="ref_model"):
        DistillDPOTrainer(student, teacher, args=_config(tmp_path), ref_model=copy.deepcopy(teacher),
                          train_dataset=preference_dataset(problems[:4]), processing_class=tokenizer)
    with pytest.raises(ValueError, match="LoRA adapter"):
        _trainer(tmp_path, student, teacher, tokenizer, problems, mode="adpa")
    small_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="(?i)vocab"):
        _trainer(tmp_path, student, small_vocab, tokenizer, problems)


# --------------------------------------------------------------------------------------------- teacher_ref
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair"])
def test_teacher_ref_equals_trl_dpo_with_teacher_as_ref_model(tmp_path, student, teacher, tokenizer, problems,
                                                              loss_type):
    trl_trainer = DPOTrainer(
        model=copy.deepcopy(student),
        ref_model=copy.deepcopy(teacher),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], beta=0.2, **cpu_args()),
        train_dataset=preference_dataset(problems[:16]),
        processing_class=tokenizer,
    )
    ours = _trainer(tmp_path, student, teacher, tokenizer, problems, loss_type=[loss_type], beta=0.2)
    batch = _batch(ours)
    expected, expected_grads = _loss_and_grads(trl_trainer, batch)
    got, got_grads = _loss_and_grads(ours, batch)
    assert torch.equal(got, expected)
    assert expected_grads.keys() == got_grads.keys() and expected_grads
    for name in expected_grads:
        assert torch.equal(got_grads[name], expected_grads[name]), name
    assert ours.ref_model is ours.teacher_model and "distill-dpo" in DistillDPOTrainer._tag_names


def test_teacher_ref_with_precomputed_reference_trains(tmp_path, student, teacher, tokenizer, problems):
    online = _trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, problems)
    ours = _trainer(tmp_path, student, teacher, tokenizer, problems, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in ours.train_dataset.column_names
    batch = _batch(ours)
    torch.testing.assert_close(_loss_and_grads(ours, batch)[0], _loss_and_grads(online, batch)[0])
    ours.train()
    logged = ours.state.log_history[0]
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "loss"} <= logged.keys()


# --------------------------------------------------------------------------------------------------- dckd
@pytest.mark.parametrize("precompute", [False, True])
def test_dckd_terms_match_hand_computation(tmp_path, student, teacher, tokenizer, problems, precompute):
    ours = _trainer(
        tmp_path, student, teacher, tokenizer, problems, mode="dckd", dpo_weight=0.5, chosen_kd_weight=0.3,
        teacher_top_k=TOP_K, beta=0.1, precompute_ref_log_probs=precompute,
    )
    batch = _batch(ours)
    loss, grads = _loss_and_grads(ours, batch)

    positions, targets, is_chosen = _hand_inputs(batch)
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_rows, t_rows = student_logits[:, :-1][positions], teacher_logits[:, :-1][positions]
    sft = F.cross_entropy(s_rows[is_chosen].double(), targets[is_chosen])
    kl_chosen = _hand_topk_forward_kl(s_rows[is_chosen], t_rows[is_chosen], TOP_K)
    kl_rejected = _hand_topk_forward_kl(s_rows[~is_chosen], t_rows[~is_chosen], TOP_K)
    logps = _hand_sequence_logps(student_logits, batch, positions, targets)
    ref_logps = _hand_sequence_logps(teacher_logits, batch, positions, targets)
    half = len(logps) // 2
    margin = (logps[:half] - ref_logps[:half]) - (logps[half:] - ref_logps[half:])
    dpo = -F.logsigmoid(0.1 * margin).mean()
    expected = 0.5 * dpo + 1.0 * sft + 0.3 * kl_chosen + 0.1 * kl_rejected
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    metrics = {name: values[-1] for name, values in ours._metrics["train"].items()}
    for name, value in (("sft_loss", sft), ("kl_chosen", kl_chosen), ("kl_rejected", kl_rejected), ("dpo_loss", dpo)):
        assert metrics[f"distill/{name}"] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    assert metrics["rewards/margins"] == pytest.approx((0.1 * margin).mean().item(), rel=1e-4, abs=1e-5)
    assert all(g.abs().sum() > 0 for g in grads.values()) and not any(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("precompute", [False, True])
def test_dckd_runs_one_student_and_one_teacher_forward(tmp_path, student, teacher, tokenizer, problems, precompute):
    """The DCKD terms reuse the backbone outputs of TRL's DPO forwards (captured), so a step costs no extra forward."""
    ours = _trainer(tmp_path, student, teacher, tokenizer, problems, mode="dckd", precompute_ref_log_probs=precompute)
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", student), ("teacher", teacher)):
        model.model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    _loss_and_grads(ours, _batch(ours))
    assert calls == {"student": 1, "teacher": 1}


def test_dpo_weight_zero_logs_rewards_without_their_gradient(tmp_path, student, teacher, tokenizer, problems):
    """dckd's default dpo_weight=0: DPO's metrics are logged, and the gradient is exactly that of the DCKD terms."""
    dckd = _trainer(tmp_path, copy.deepcopy(student), teacher, tokenizer, problems, mode="dckd")
    dckd_plus_dpo = _trainer(tmp_path, student, copy.deepcopy(teacher), tokenizer, problems, mode="dckd",
                             dpo_weight=1e-12)
    batch = _batch(dckd)
    loss, grads = _loss_and_grads(dckd, batch)
    loss_tiny_dpo, grads_tiny_dpo = _loss_and_grads(dckd_plus_dpo, batch)
    torch.testing.assert_close(loss, loss_tiny_dpo)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_tiny_dpo[name])
    assert "rewards/accuracies" in dckd._metrics["train"] and "distill/dpo_loss" in dckd._metrics["train"]


# --------------------------------------------------------------------------------------------------- adpa
@pytest.mark.parametrize("clamp", [None, [0.0, 1.0]])
def test_adpa_on_rejected_matches_hand_computation(tmp_path, student, teacher, tokenizer, problems, clamp):
    lora_teacher = _lora_teacher(teacher)
    ours = _trainer(
        tmp_path, student, lora_teacher, tokenizer, problems, mode="adpa", adpa_responses="rejected",
        teacher_top_k=TOP_K, advantage_clamp=clamp,
    )
    batch = _batch(ours)
    loss, _ = _loss_and_grads(ours, batch)

    positions, targets, is_chosen = _hand_inputs(batch)
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_logits = student(**model_inputs).logits[:, :-1][positions]
        aligned_logits = lora_teacher(**model_inputs).logits[:, :-1][positions]
        with lora_teacher.disable_adapter():
            reference_logits = lora_teacher(**model_inputs).logits[:, :-1][positions]
    assert not torch.allclose(aligned_logits, reference_logits)  # one adapter really serves two teachers
    aligned_lp, reference_lp = aligned_logits.double().log_softmax(-1), reference_logits.double().log_softmax(-1)
    actions = aligned_lp.topk(TOP_K, dim=-1).indices
    advantage = aligned_lp.gather(-1, actions) - reference_lp.gather(-1, actions)
    if clamp is not None:
        advantage = advantage.clamp(*clamp)
    q = student_logits.double().softmax(-1).gather(-1, actions)
    adpa = -(q * advantage).sum(-1)[~is_chosen].mean()
    sft = F.cross_entropy(student_logits[is_chosen].double(), targets[is_chosen])
    torch.testing.assert_close(loss.double(), 1.0 * sft + 1.6 * adpa, rtol=1e-5, atol=1e-6)
    metrics = {name: values[-1] for name, values in ours._metrics["train"].items()}
    assert metrics["distill/adpa_loss"] == pytest.approx(adpa.item(), rel=1e-5, abs=1e-6)
    assert metrics["distill/advantage"] == pytest.approx(advantage[~is_chosen].mean().item(), rel=1e-5, abs=1e-6)


def test_adpa_advantage_term_is_zero_for_identical_teachers():
    logits = torch.randn(6, 11)
    loss, advantage = adpa_advantage_term(torch.randn(6, 11, requires_grad=True), logits, logits.clone(), top_k=4)
    assert loss.item() == 0.0 and advantage.item() == 0.0


def test_adpa_on_student_greedy_responses(tmp_path, student, teacher, tokenizer, problems):
    lora_teacher = _lora_teacher(teacher)
    ours = _trainer(tmp_path, student, lora_teacher, tokenizer, problems, mode="adpa", adpa_max_new_tokens=5,
                    teacher_top_k=TOP_K)
    batch = _batch(ours)
    input_ids, attention_mask, completion_mask = ours._student_responses(ours.model, batch)
    half = batch["input_ids"].size(0) // 2
    for row in range(half):
        prompt = batch["input_ids"][row][(batch["completion_mask"][row] == 0) & (batch["attention_mask"][row] == 1)]
        length = int(attention_mask[row].sum())
        assert torch.equal(input_ids[row, : len(prompt)], prompt)
        response = input_ids[row, len(prompt):length]
        assert completion_mask[row, len(prompt):length].all() and not completion_mask[row, : len(prompt)].any()
        greedy = student.generate(prompt[None], max_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert torch.equal(response, greedy[0, len(prompt):len(prompt) + len(response)])
    ours.train()
    logged = ours.state.log_history[0]
    assert {"distill/adpa_loss", "distill/advantage", "distill/sft_loss", "rewards/accuracies"} <= logged.keys()
    assert 1 <= logged["distill/adpa_response_length"] <= 5


# -------------------------------------------------------------------------------- 4-bit, adapters, LoRA student
def test_4bit_teacher_base_with_one_adapter_for_both_teachers(tmp_path, student, teacher, tokenizer, problems):
    pytest.importorskip("bitsandbytes")
    teacher_dir, adapter_dir = tmp_path / "teacher", tmp_path / "adapter"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    _lora_teacher(copy.deepcopy(teacher)).save_pretrained(adapter_dir)
    ours = _trainer(tmp_path, student, str(teacher_dir), tokenizer, problems, mode="adpa", adpa_responses="rejected",
                    teacher_quantization="4bit", teacher_adapter=str(adapter_dir), teacher_top_k=TOP_K,
                    chosen_kd_weight=0.1)
    assert getattr(ours.teacher_model.get_base_model(), "is_loaded_in_4bit", False)
    assert not any(p.requires_grad for p in ours.teacher_model.parameters())
    ours.train()
    logged = ours.state.log_history[0]
    assert torch.isfinite(torch.tensor(logged["loss"]))
    assert logged["distill/advantage"] != 0.0 and "distill/kl_chosen" in logged


def test_lora_student_trains_only_its_adapter(tmp_path, student, teacher, tokenizer, problems):
    ours = DistillDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, mode="dckd", dpo_weight=1.0),
        train_dataset=preference_dataset(problems[:16]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    ours.train()
    changed = {n for n, p in ours.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {"distill/kl_chosen", "rewards/margins"} <= ours.state.log_history[0].keys()


# ------------------------------------------------------------------------------------- token terms across a step
@pytest.mark.parametrize("mode", ["dckd", "adpa"])
def test_token_terms_accumulate_like_one_batch(tmp_path, student, teacher, tokenizer, problems, monkeypatch, mode):
    # SPEC: token losses are divided by the completion tokens of the whole accumulated batch. The addition task's
    # answers have 1 to 3 digits, so the two micro-batches hold different token counts.
    overrides = dict(mode=mode, dpo_weight=0.5)
    if mode == "adpa":
        teacher = _lora_teacher(teacher)
        overrides.update(adpa_responses="rejected", teacher_top_k=TOP_K)
    else:
        overrides.update(teacher_top_k=TOP_K)
    # Per-micro-batch means (the previous behaviour, and TRL's DPO `sft` term) would differ on this data.
    assert_accumulation_equals_one_batch(
        student,
        lambda model, name, **args: _trainer(tmp_path / name, model, teacher, tokenizer, problems, **args, **overrides),
        DistillDPOTrainer,
        monkeypatch,
    )
