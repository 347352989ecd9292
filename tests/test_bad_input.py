"""Bad inputs fail early and clearly: every case raises at config construction or trainer __init__ (never in a
training step), from trl_distill's own checks, with a message that names the column, field or model at fault.

One check needs data: a teacher head whose rows beyond the compared columns carry probability is measured on the
first batch, before the first optimizer step (`test_teacher_mass_beyond_the_shared_columns_stops_the_first_step`)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_distill import addition
from trl_distill.testing import pad_output_head, tiny_causal_lm
from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer
from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer
from trl_distill.trainers.gkd import GKDVariant, GKDVariantConfig
from trl_distill.trainers.okd import OKDConfig, OKDTrainer
from trl_distill.trainers.redi import REDIConfig, REDITrainer

from .conftest import cpu_args

N = 8  # rows per dataset: validation runs on whole datasets, tokenization must stay cheap


# ------------------------------------------------------------------------------------------------ bad inputs
def _small_head_teacher(tokenizer):
    """A teacher whose output head (10 rows) cannot score the tokenizer's vocabulary."""
    config = LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _no_template_tokenizer():
    tokenizer = addition.make_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def _blank(messages):
    return [{**message, "content": ""} if message["role"] == "assistant" else message for message in messages]


def _blanked(build, column):
    """A dataset builder whose `column` has every assistant message emptied."""
    return lambda problems, tokenizer: build(problems).map(lambda row: {column: _blank(row[column])})


def _sft(problems, **kw):
    return addition.sft_dataset(problems[:N], **kw)


def _pairs(problems):
    return addition.preference_dataset(problems[:N])


def _lists(problems, k=4):
    return addition.listwise_dataset(problems[:N], k=k)


# Each case: (trainer, name, build overrides, expected message pattern). A build override maps some of
# `dataset`, `tokenizer`, `teacher`, `config` (extra config fields) to a function of the fixtures.
CASES = [
    # ---- GKDVariant
    ("gkd", "missing_messages", dict(dataset=lambda p, t: _sft(p).remove_columns("messages")), "messages"),
    ("gkd", "misnamed_messages", dict(dataset=lambda p, t: _sft(p).rename_column("messages", "conversation")),
     "messages"),
    ("gkd", "empty_completion", dict(dataset=_blanked(_sft, "messages")),
     "messages"),
    ("gkd", "vocab_mismatch", dict(teacher=_small_head_teacher), "teacher"),
    ("gkd", "no_chat_template", dict(tokenizer=_no_template_tokenizer), "chat template"),
    ("gkd", "beta_out_of_range", dict(config=dict(beta=1.5)), "beta"),
    ("gkd", "unknown_loss_type", dict(config=dict(loss_type="kl")), "loss_type"),
    ("gkd", "temperature_zero", dict(config=dict(loss_temperature=0.0)), "loss_temperature"),
    ("gkd", "negative_skew_alpha", dict(config=dict(skew_alpha=-0.1)), "skew_alpha"),
    # ---- OKDTrainer
    ("okd", "misnamed_messages", dict(dataset=lambda p, t: _sft(p).rename_column("messages", "conversation")),
     "messages"),
    ("okd", "misnamed_completion",
     dict(dataset=lambda p, t: _sft(p, format="prompt_completion").rename_column("completion", "response")),
     "completion"),
    ("okd", "empty_completion",
     dict(dataset=_blanked(lambda p: _sft(p, format="prompt_completion"), "completion")),
     "completion"),
    ("okd", "vocab_mismatch", dict(teacher=_small_head_teacher), "teacher"),
    ("okd", "no_chat_template", dict(tokenizer=_no_template_tokenizer), "chat template"),
    ("okd", "negative_alpha", dict(config=dict(alpha=-0.5)), "alpha"),
    ("okd", "beta_out_of_range", dict(config=dict(beta=2.0)), "beta"),
    ("okd", "unknown_loss_type", dict(config=dict(loss_type="kl")), "loss_type"),
    ("okd", "unknown_teacher_update", dict(config=dict(teacher_update="sometimes")), "teacher_update"),
    ("okd", "temperature_zero", dict(config=dict(loss_temperature=0.0)), "loss_temperature"),
    # ---- DistillDPOTrainer
    ("distill_dpo", "missing_chosen", dict(dataset=lambda p, t: _pairs(p).remove_columns("chosen")), "chosen"),
    ("distill_dpo", "missing_rejected", dict(dataset=lambda p, t: _pairs(p).rename_column("rejected", "loser")),
     "rejected"),
    ("distill_dpo", "empty_completion", dict(dataset=_blanked(_pairs, "chosen")),
     "chosen"),
    ("distill_dpo", "vocab_mismatch", dict(teacher=_small_head_teacher), "teacher"),
    ("distill_dpo", "no_chat_template", dict(tokenizer=_no_template_tokenizer), "chat template"),
    ("distill_dpo", "unknown_mode", dict(config=dict(mode="magic")), "mode"),
    ("distill_dpo", "negative_weight", dict(config=dict(mode="dckd", sft_weight=-1.0)), "sft_weight"),
    ("distill_dpo", "zero_top_k", dict(config=dict(teacher_top_k=0)), "teacher_top_k"),
    # ---- ADPOTrainer (listwise unless said otherwise)
    ("adpo", "pairs_missing_rejected", dict(dataset=lambda p, t: _pairs(p).remove_columns("rejected")), "rejected"),
    ("adpo", "missing_rewards", dict(dataset=lambda p, t: _lists(p).remove_columns("rewards")), "rewards"),
    ("adpo", "misnamed_completions", dict(dataset=lambda p, t: _lists(p).rename_column("completions", "candidates")),
     "completions"),
    ("adpo", "one_completion", dict(dataset=lambda p, t: _lists(p).map(
        lambda r: {"completions": r["completions"][:1], "rewards": r["rewards"][:1]})), "completions"),
    ("adpo", "rewards_length_mismatch",
     dict(dataset=lambda p, t: _lists(p).map(lambda r: {"rewards": r["rewards"][:3]})),
     "rewards"),
    ("adpo", "empty_completion", dict(dataset=lambda p, t: _lists(p).map(
        lambda r: {"completions": [_blank(c) for c in r["completions"]]})), "completions"),
    ("adpo", "vocab_mismatch", dict(teacher=_small_head_teacher, config=dict(anchor="teacher")), "teacher"),
    ("adpo", "no_chat_template", dict(tokenizer=_no_template_tokenizer), "chat template"),
    ("adpo", "tau_zero", dict(config=dict(tau=0.0)), "tau"),
    ("adpo", "unknown_anchor", dict(config=dict(anchor="moving")), "anchor"),
    ("adpo", "unknown_loss_type", dict(config=dict(loss_type=["ipo"])), "loss_type"),
    # ---- REDITrainer (no teacher: no vocabulary case)
    ("redi", "missing_chosen", dict(dataset=lambda p, t: _pairs(p).remove_columns("chosen")), "chosen"),
    ("redi", "misnamed_rejected", dict(dataset=lambda p, t: _pairs(p).rename_column("rejected", "loser")), "rejected"),
    ("redi", "empty_completion", dict(dataset=_blanked(_pairs, "rejected")),
     "rejected"),
    ("redi", "no_chat_template", dict(tokenizer=_no_template_tokenizer), "chat template"),
    ("redi", "negative_alpha", dict(config=dict(alpha=-0.1)), "alpha"),
    ("redi", "unused_loss_type", dict(config=dict(loss_type=["ipo"])), "loss_type"),
]

DEFAULT_DATASETS = {
    "gkd": _sft,
    "okd": _sft,
    "distill_dpo": _pairs,
    "adpo": _lists,
    "redi": _pairs,
}


def _build(kind, overrides, student, teacher, tokenizer, problems, tmp_path):
    """Construct config then trainer exactly as a user would; any error must come from one of these two calls."""
    tokenizer = overrides["tokenizer"]() if "tokenizer" in overrides else tokenizer
    teacher = overrides["teacher"](tokenizer) if "teacher" in overrides else teacher
    dataset = (overrides.get("dataset") or (lambda p, t: DEFAULT_DATASETS[kind](p)))(problems, tokenizer)
    fields = {**cpu_args(), **overrides.get("config", {})}
    common = dict(train_dataset=dataset, processing_class=tokenizer)
    if kind == "gkd":
        args = GKDVariantConfig(output_dir=str(tmp_path), lmbda=0.0, **fields)
        return GKDVariant(model=student, teacher_model=teacher, args=args, **common)
    if kind == "okd":
        args = OKDConfig(output_dir=str(tmp_path), **fields)
        return OKDTrainer(model=student, teacher_model=teacher, args=args, **common)
    if kind == "distill_dpo":
        args = DistillDPOConfig(output_dir=str(tmp_path), **fields)
        return DistillDPOTrainer(model=student, teacher_model=teacher, args=args, **common)
    if kind == "adpo":
        args = ADPOConfig(output_dir=str(tmp_path), **fields)
        uses_teacher = args.anchor == "teacher"
        return ADPOTrainer(model=student, teacher_model=teacher if uses_teacher else None, args=args, **common)
    args = REDIConfig(output_dir=str(tmp_path), **fields)
    return REDITrainer(model=student, args=args, **common)


@pytest.mark.parametrize(("kind", "case", "overrides", "names"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_fails_early_naming_the_culprit(kind, case, overrides, names, student, teacher, tokenizer, problems,
                                                  tmp_path):
    with pytest.raises((ValueError, TypeError)) as excinfo:
        _build(kind, overrides, student, teacher, tokenizer, problems, tmp_path)
    message = str(excinfo.value)
    assert names.lower() in message.lower(), f"{kind}/{case}: error does not name {names!r}: {message}"
    # Raised by trl_distill's own validation, not from deep inside torch / transformers / TRL.
    origin = str(excinfo.traceback[-1].path)
    assert "trl_distill" in origin, f"{kind}/{case}: raised from {origin}: {message}"


@pytest.mark.parametrize("kind", sorted(DEFAULT_DATASETS))
def test_good_input_builds(kind, student, teacher, tokenizer, problems, tmp_path):
    """The baseline every bad case departs from is accepted (so each failure above is due to its one change)."""
    _build(kind, {}, student, teacher, tokenizer, problems, tmp_path)


def test_eval_datasets_are_checked_and_named(student, tokenizer, problems, tmp_path):
    bad = _pairs(problems).remove_columns("rejected")
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\].*`rejected`"):
        REDITrainer(model=student, args=REDIConfig(output_dir=str(tmp_path), **cpu_args()),
                    train_dataset=_pairs(problems), eval_dataset={"held_out": bad}, processing_class=tokenizer)


# ------------------------------------------------------------------------------------------------ teacher vocabulary
TEACHER_KINDS = ("gkd", "okd", "distill_dpo", "adpo")


def _teacher_config(kind):
    return {"anchor": "teacher"} if kind == "adpo" else {}


def _save_with_swapped_tokens(teacher, tokenizer, path):
    """Save `teacher` with a tokenizer of the same size whose ids of '0' and '1' are swapped (another vocabulary)."""
    import json

    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tokenizer_file = path / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    vocab = data["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    tokenizer_file.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_teacher_path_with_another_tokenizer_is_rejected(kind, student, teacher, tokenizer, problems, tmp_path):
    path = tmp_path / "other-vocab-teacher"
    _save_with_swapped_tokens(teacher, tokenizer, path)
    # Given through the config field, which every trainer with a teacher honours.
    overrides = dict(teacher=lambda t: None, config={**_teacher_config(kind), "teacher_model_name_or_path": str(path)})
    with pytest.raises(ValueError) as excinfo:
        _build(kind, overrides, student, teacher, tokenizer, problems, tmp_path / "run")
    message = str(excinfo.value)
    assert "student" in message and str(path) in message, message
    assert "'0'" in message and "'1'" in message, message  # the tokens whose ids differ


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_teacher_path_with_the_same_tokenizer_is_used(kind, student, teacher, tokenizer, problems, tmp_path):
    path = tmp_path / "teacher"
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    overrides = dict(teacher=lambda t: None, config={**_teacher_config(kind), "teacher_model_name_or_path": str(path)})
    trainer = _build(kind, overrides, student, teacher, tokenizer, problems, tmp_path / "run")
    loaded = trainer.ref_model if kind == "adpo" else trainer.teacher_model
    loaded = trainer.accelerator.unwrap_model(loaded)
    base = [p for name, p in loaded.named_parameters() if "lora_" not in name]  # OKD adds its online module
    for ours, saved in zip(base, teacher.parameters(), strict=True):
        torch.testing.assert_close(ours, saved, rtol=0, atol=0)


def _wide_head_teacher(tokenizer):
    """A teacher whose head has 13 rows past the tokenizer that carry real probability (as tokens the student's
    tokenizer lacks would): a random head gives them as much mass as any token."""
    return tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1, padded_vocab=len(tokenizer) + 13)


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_teacher_mass_beyond_the_shared_columns_stops_the_first_step(kind, student, tokenizer, problems, tmp_path):
    overrides = dict(teacher=_wide_head_teacher, config={**_teacher_config(kind), "max_steps": 1})
    trainer = _build(kind, overrides, student, None, tokenizer, problems, tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=r"puts up to \d+\.\d+% of its probability .* on the other 13 rows"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # no step was taken


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_teacher_head_padded_like_a_checkpoint_trains(kind, student, tokenizer, problems, tmp_path):
    # Qwen-style: rows past the tokenizer that the trained teacher never predicts (~0 mass) are accepted.
    padded = lambda t: pad_output_head(tiny_causal_lm(t, 64, 2, 4, seed=1), len(t) + 13)  # noqa: E731
    overrides = dict(teacher=padded, config={**_teacher_config(kind), "max_steps": 1})
    trainer = _build(kind, overrides, student, None, tokenizer, problems, tmp_path)
    assert trainer.vocab_columns == len(tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize(
    ("config_class", "field", "value"),
    [(GKDVariantConfig, "loss_type", "nonsense"), (OKDConfig, "teacher_update", "sometimes"),
     (DistillDPOConfig, "mode", "magic"), (ADPOConfig, "tau", 0.0), (REDIConfig, "alpha", -1.0),
     (GKDVariantConfig, "teacher_quantization", "8bit")],
)
def test_own_fields_are_checked_before_trl_ones(config_class, field, value, tmp_path):
    # No CPU overrides: on a machine without bf16 TRL's default would fail its own check first; ours must name the field.
    with pytest.raises(ValueError, match=field):
        config_class(output_dir=str(tmp_path), **{field: value})
