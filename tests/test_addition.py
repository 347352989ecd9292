"""The shipped addition task: tokenizer, chat template with TRL's collators and trainers, data builders, checkers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.chat_template_utils import is_chat_template_stop_token_trained
from trl.experimental.utils import DataCollatorForChatML

from trl_distill import addition
from trl_distill.addition import (
    END,
    SPECIAL_TOKENS,
    answer,
    exact_match,
    generate_completions,
    is_exact,
    listwise_dataset,
    make_problems,
    make_splits,
    parse_completion,
    preference_dataset,
    reward_exact_match,
    sft_dataset,
    wrong_answers,
)
from trl_distill.testing import tiny_causal_lm, train_sft

from .conftest import cpu_args


CONVERSATION = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "64"}]


# --- tokenizer and chat template ---------------------------------------------------------------------------------


def test_character_level_round_trip_without_spaces(tokenizer):
    ids = tokenizer("47+85=231", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9
    assert tokenizer.decode(ids) == "47+85=231"
    assert tokenizer.convert_ids_to_tokens(ids) == list("47+85=231")


def test_special_tokens_are_single_ids(tokenizer):
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<|end|>", None)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    # No post-processor: encoding adds nothing, so TRL's and our tokenizations agree.
    assert tokenizer("1")["input_ids"] == tokenizer("1", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer("x")["input_ids"]) == "<unk>"


def test_chat_template_renders_exactly(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "<|user|>12+34=<|assistant|>64<|end|>"
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>12+34=<|assistant|>"
    system = [{"role": "system", "content": "add"}, *CONVERSATION]
    assert tokenizer.apply_chat_template(system, tokenize=False) == "<|system|>add<|user|>12+34=<|assistant|>64<|end|>"
    parts = [{"role": "user", "content": [{"type": "text", "text": "12+34="}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == "<|user|>12+34="
    with pytest.raises(Exception, match="Unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "1"}], tokenize=False)


def test_assistant_mask_covers_answer_and_end(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "64<|end|>"
    assert out["assistant_masks"] == [0] * 8 + [1] * 3
    assert is_chat_template_stop_token_trained(tokenizer)


def test_save_and_load_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token, loaded.eos_token, loaded.padding_side) == ("<pad>", "<|end|>", "right")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_chatml_collator_labels_exactly_the_completion(tokenizer, problems):
    rows = list(sft_dataset(problems[:6], format="messages"))
    batch = DataCollatorForChatML(tokenizer=tokenizer)(rows)
    for row, ids, labels, prompt in zip(rows, batch["input_ids"], batch["labels"], batch["prompts"]):
        target = tokenizer(row["answer"] + END)["input_ids"]
        n = len(target)
        # Left padding: the completion is the last n tokens and the only labelled ones.
        assert labels[-n:].tolist() == ids[-n:].tolist() == target
        assert (labels[:-n] == -100).all()
        prompt_messages = row["messages"][:1]
        expected_prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(prompt[prompt != tokenizer.pad_token_id]) == expected_prompt
        assert tokenizer.decode(ids[ids != tokenizer.pad_token_id][:-n]) == expected_prompt


@pytest.mark.parametrize("format", ["messages", "prompt_completion", "language_modeling"])
def test_sft_trainer_trains_on_each_format(tmp_path, tokenizer, student, problems, format):
    extra = {"assistant_only_loss": True} if format == "messages" else {}
    trainer = SFTTrainer(
        model=student,
        args=SFTConfig(output_dir=str(tmp_path), **extra, **cpu_args(max_steps=1)),
        train_dataset=sft_dataset(problems[:8], format=format),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    text = tokenizer.apply_chat_template(sft_dataset(problems[:1])[0]["messages"], tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == text
    trained = row.get("assistant_masks") or row.get("completion_mask")
    if trained is not None:  # language modeling trains on every token
        assert tokenizer.decode([i for i, m in zip(row["input_ids"], trained) if m]) == answer(*problems[0]) + END
    trainer.train()


def test_dpo_trainer_tokenizes_preferences(tmp_path, tokenizer, student, teacher, problems):
    trainer = DPOTrainer(
        model=student,
        ref_model=teacher,
        args=DPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=1)),
        train_dataset=preference_dataset(problems[:8]),
        processing_class=tokenizer,
    )
    row, source = trainer.train_dataset[0], preference_dataset(problems[:1])[0]
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.apply_chat_template(
        source["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(row["chosen_ids"]) == source["chosen"][0]["content"] + END
    assert tokenizer.decode(row["rejected_ids"]) == source["rejected"][0]["content"] + END
    trainer.train()


# --- problems and datasets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected", [(47, 85, "231"), (12, 34, "64"), (10, 10, "02"), (99, 99, "891"), (50, 50, "001"), (5, 7, "21")]
)
def test_answer_is_reversed_sum(a, b, expected):
    assert answer(a, b) == expected


def test_make_problems_distinct_deterministic_prefix_stable():
    problems = make_problems(300, seed=3)
    assert problems == make_problems(300, seed=3) != make_problems(300, seed=4)
    assert len(set(problems)) == 300
    assert all(10 <= x <= 99 for pair in problems for x in pair)
    assert make_problems(100, seed=3) == problems[:100]
    assert all(100 <= x <= 999 for pair in make_problems(50, seed=0, digits=3) for x in pair)
    assert len(set(make_problems(8100, seed=0))) == 8100
    with pytest.raises(ValueError):
        make_problems(8101, seed=0)


def test_splits_disjoint_and_fixed():
    train, evaluation = make_splits(seed=0)
    assert (len(train), len(evaluation)) == (4000, 500)
    assert not set(train) & set(evaluation)
    assert make_splits(seed=0) == (train, evaluation)
    assert make_splits(seed=0, n_train=10)[1] == evaluation  # eval does not move with the train size
    assert make_splits(seed=1)[1] != evaluation


def test_sft_dataset_formats(problems):
    messages = sft_dataset(problems[:2], format="messages")
    a, b = problems[0]
    assert messages[0] == {
        "messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": answer(a, b)}],
        "answer": answer(a, b),
    }
    completion = sft_dataset(problems[:2], format="prompt_completion")[0]
    assert completion["prompt"] == messages[0]["messages"][:1]
    assert completion["completion"] == messages[0]["messages"][1:]
    text = sft_dataset(problems[:2], format="language_modeling")[0]["text"]
    assert text == f"<|user|>{a}+{b}=<|assistant|>{answer(a, b)}<|end|>"
    with pytest.raises(ValueError, match="format"):
        sft_dataset(problems, format="chat")


def test_preference_chosen_right_rejected_wrong_and_plausible():
    problems = make_problems(400, seed=0)
    data = preference_dataset(problems, seed=0)
    assert set(data.column_names) == {"prompt", "chosen", "rejected", "answer"}
    assert reward_exact_match(data["chosen"], data["answer"]) == [1.0] * 400
    assert reward_exact_match(data["rejected"], data["answer"]) == [0.0] * 400
    rejected = [r[0]["content"] for r in data["rejected"]]
    assert all(r.isdigit() and 1 <= len(r) <= 3 for r in rejected)
    assert preference_dataset(problems, seed=0)["rejected"] == data["rejected"]
    assert preference_dataset(problems, seed=1)["rejected"] != data["rejected"]
    # Every kind of mistake shows up: forgotten carry, not reversed, dropped final carry, one digit off.
    kinds = {kind for (a, b), r in zip(problems, rejected) for kind, c in wrong_answers(a, b).items() if r in c}
    assert kinds == {"no_carry", "not_reversed", "dropped_carry", "digit_off"}
    assert wrong_answers(47, 85)["no_carry"] == ["22"] and wrong_answers(47, 85)["not_reversed"] == ["132"]


@pytest.mark.parametrize("k, n_correct", [(4, 1), (6, 2)])
def test_listwise_rewards_agree_with_checker(k, n_correct):
    problems = make_problems(100, seed=0)
    data = listwise_dataset(problems, k=k, seed=0, n_correct=n_correct)
    for row in data:
        assert len(row["completions"]) == len(row["rewards"]) == k
        assert row["rewards"] == reward_exact_match(row["completions"], [row["answer"]] * k)
        assert sum(row["rewards"]) == n_correct
        wrong = [c[0]["content"] for c, r in zip(row["completions"], row["rewards"]) if r == 0.0]
        assert len(set(wrong)) == len(wrong)
    positions = {row["rewards"].index(1.0) for row in data}
    assert len(positions) > 1  # the correct completion is not always in the same slot
    assert listwise_dataset(problems, k=k, seed=0, n_correct=n_correct)["completions"] == data["completions"]


def test_reward_exact_match_conventions():
    conversational = [[{"role": "assistant", "content": "231"}], [{"role": "assistant", "content": "132"}]]
    assert reward_exact_match(conversational, ["231", "231"], prompts=None, trainer_state=None) == [1.0, 0.0]
    strings = ["231<|end|>", " 231 ", "231<|end|>5", "2315", ""]
    assert reward_exact_match(strings, ["231"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert reward_exact_match(["64"], [64]) == [1.0]  # an integer answer column works too
    with pytest.raises(ValueError):
        reward_exact_match(["1"], ["1", "2"])


def test_parse_and_strict_check():
    assert parse_completion("<|assistant|>64<|end|><pad><pad>") == "64"
    assert parse_completion("64<pad>") == "64"
    assert is_exact("64<|end|><pad>", "64") and is_exact("231<|end|>", "231")
    assert not is_exact("64", "64")  # never stopped
    assert not is_exact("641<|end|>", "64") and not is_exact("6<|end|>", "64")


# --- greedy evaluation -------------------------------------------------------------------------------------------

# One-digit operands make prompts of different lengths, so batching exercises left padding.
MEMORIZED = [(3, 4), (12, 34), (47, 85), (99, 99), (5, 61), (70, 8), (26, 26), (81, 19)]


@pytest.fixture(scope="module")
def memorizer():
    """A real tiny model trained (honestly, with `train_sft`) until it has memorized eight problems."""
    tokenizer = addition.make_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    untrained = exact_match(model, tokenizer, MEMORIZED)
    train_sft(model, tokenizer, MEMORIZED, steps=80, batch_size=8, lr=1e-2, warmup_steps=10, log_every=0)
    return model, tokenizer, untrained


def test_exact_match_on_memorized_problems(memorizer):
    model, tokenizer, untrained = memorizer
    assert untrained == 0.0
    model.train()
    assert exact_match(model, tokenizer, MEMORIZED) == 1.0
    assert model.training  # mode restored
    # Batching and left padding do not change the answers.
    assert exact_match(model, tokenizer, MEMORIZED, batch_size=3) == 1.0
    completions = generate_completions(model.eval(), tokenizer, MEMORIZED, batch_size=5)
    assert [parse_completion(c) for c in completions] == [answer(a, b) for a, b in MEMORIZED]
    # Too few new tokens for a three-digit answer and its end token: those no longer count.
    short = exact_match(model, tokenizer, MEMORIZED, max_new_tokens=3)
    assert short == sum(len(answer(a, b)) < 3 for a, b in MEMORIZED) / len(MEMORIZED)
    assert exact_match(model, tokenizer, [(1, 1)] + MEMORIZED[1:]) < 1.0  # an unseen problem is not free


def test_exact_match_with_peft_model(memorizer):
    model, tokenizer, _ = memorizer
    # LoRA starts as the identity (B = 0), so the wrapped model answers exactly like the base model.
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    try:
        assert exact_match(peft_model, tokenizer, MEMORIZED) == 1.0
    finally:
        peft_model.unload()


def test_exact_match_with_padded_head(tokenizer):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0, padded_vocab=64)
    # Real rows score 0 and one of two opposite padding rows scores > 0: greedy picks an id past the tokenizer.
    with torch.no_grad():
        head = model.lm_head.weight
        head.zero_()
        head[len(tokenizer)] = torch.randn(head.shape[1])
        head[len(tokenizer) + 1] = -head[len(tokenizer)]
    completions = generate_completions(model, tokenizer, MEMORIZED[:2])
    assert completions == ["<unk>" * 4] * 2
    assert exact_match(model, tokenizer, MEMORIZED[:2]) == 0.0
    with pytest.raises(ValueError):
        exact_match(model, tokenizer, [])
