"""The benchmark task with a known distribution (`trl_distill.hmm_task`): p* is a distribution, the forward
algorithm equals brute-force marginalisation, the KL estimators are unbiased, and the data is the same in every
process."""

import hashlib
import itertools
import math
import subprocess
import sys

import pytest
import torch

from trl_distill import hmm_task

TINY = hmm_task.TaskConfig(n_states=3, n_words=4, n_successors=2, n_emissions=2, prompt_length=2,
                           completion_length=3, seed=7)


def brute_force_log_prob(lang: hmm_task.HMMLanguage, words: list[int]) -> float:
    """log P(words) by summing over every hidden path (no forward algorithm)."""
    total = 0.0
    for path in itertools.product(range(lang.config.n_states), repeat=len(words)):
        p = lang.initial[path[0]] * lang.emission[path[0], words[0]]
        for t in range(1, len(words)):
            p = p * lang.transition[path[t - 1], path[t]] * lang.emission[path[t], words[t]]
        total += float(p)
    return math.log(total) if total > 0 else float("-inf")


def test_the_hmm_is_sparse_and_stochastic():
    lang = hmm_task.language()
    config = lang.config
    assert torch.allclose(lang.transition.sum(1), torch.ones(config.n_states, dtype=torch.float64))
    assert torch.allclose(lang.emission.sum(1), torch.ones(config.n_states, dtype=torch.float64))
    assert ((lang.transition > 0).sum(1) == config.n_successors).all()
    assert ((lang.emission > 0).sum(1) == config.n_emissions).all()


def test_p_star_sums_to_one_over_all_completions():
    lang = hmm_task.HMMLanguage(TINY)
    prompts, _ = hmm_task.sample_pairs(TINY, 4, "eval")
    completions = torch.tensor(list(itertools.product(range(TINY.n_words), repeat=TINY.completion_length)))
    for prompt in prompts:
        log_p = lang.completion_log_prob(prompt.expand(len(completions), -1), completions)
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (log_p == float("-inf")).any()  # the sparse HMM makes some completions impossible
    rows = lang.completion_next_token_probs(prompts, completions[: len(prompts)])
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:2], dtype=torch.float64))


def test_forward_algorithm_equals_brute_force_marginalisation():
    lang = hmm_task.HMMLanguage(TINY)
    prompts, completions = hmm_task.sample_pairs(TINY, 5, "eval")
    words = torch.cat([prompts, completions], 1)
    forward = lang.token_log_probs(words).sum(1)
    for i in range(len(words)):
        assert forward[i].item() == pytest.approx(brute_force_log_prob(lang, words[i].tolist()), abs=1e-10)
    # the conditional is the joint ratio: log p*(y | x) = log p(x, y) - log p(x)
    for i in range(len(words)):
        expected = brute_force_log_prob(lang, words[i].tolist()) - brute_force_log_prob(lang, prompts[i].tolist())
        assert lang.completion_log_prob(prompts[i : i + 1], completions[i : i + 1]).item() == pytest.approx(expected)


class FixedDistribution(torch.nn.Module):
    """A "model" whose next-token distribution is the same softmax(logits) at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.float())

    def forward(self, input_ids, **kwargs):
        class Output:
            pass

        output = Output()
        output.logits = self.logits.expand(*input_ids.shape, -1)
        return output


def test_kl_estimators_are_unbiased_against_a_closed_form():
    """One hidden state: p* is i.i.d. over words, so KL(p* || q) per token has a closed form."""
    config = hmm_task.TaskConfig(n_states=1, n_words=6, n_successors=1, n_emissions=4, prompt_length=2,
                                 completion_length=5, concentration=1.0, seed=3)
    lang = hmm_task.language(config)
    p_words = lang.emission[0]
    logits = torch.randn(config.n_words + hmm_task.WORD_OFFSET, generator=torch.Generator().manual_seed(0))
    q = torch.softmax(logits.double(), 0)
    support = p_words > 0
    kl_words = (p_words[support] * (p_words[support].log() - q[hmm_task.WORD_OFFSET:][support].log())).sum()
    closed_form = (config.completion_length * kl_words - q[hmm_task.END_ID].log()) / (config.completion_length + 1)
    model = FixedDistribution(logits)

    prompts, completions = hmm_task.sample_pairs(config, 4000, "eval")
    full = hmm_task.forward_kl(model, config, prompts, completions)
    assert full == pytest.approx(closed_form.item(), rel=1e-5)  # exact here: every position has the same p*
    sampled = hmm_task.forward_kl(model, config, prompts, completions, sampled_token=True)
    # the Monte-Carlo form is unbiased: within 4 standard errors of the closed form
    per_sequence = (lang.completion_log_prob(prompts, completions) - torch.log_softmax(logits.double(), 0)[
        completions + hmm_task.WORD_OFFSET].sum(1) - q[hmm_task.END_ID].log()) / (config.completion_length + 1)
    standard_error = per_sequence.std().item() / math.sqrt(len(per_sequence))
    assert abs(sampled - closed_form.item()) < 4 * standard_error
    assert per_sequence.mean().item() == pytest.approx(sampled, rel=1e-4)


def test_both_kl_forms_agree_on_the_real_task():
    config = hmm_task.TaskConfig()
    tokenizer = hmm_task.make_tokenizer(config.n_words)
    from trl_distill.testing import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, seed=0)
    prompts, completions = hmm_task.sample_pairs(config, 400, "eval")
    full = hmm_task.forward_kl(model, config, prompts, completions)
    sampled = hmm_task.forward_kl(model, config, prompts, completions, sampled_token=True)
    assert full > 1.0  # a random model is far from p*
    assert sampled == pytest.approx(full, rel=0.05)


def test_completion_log_probs_are_the_models_next_token_distributions():
    """Slot t of `completion_log_probs` predicts completion token t (slot L the end): the log-probs of the actual
    tokens give the model's own SFT loss on the sequence; the model is put back in the mode it was in."""
    config = hmm_task.TaskConfig()
    from trl_distill.testing import tiny_causal_lm

    model = tiny_causal_lm(hmm_task.make_tokenizer(config.n_words), hidden_size=16, num_layers=1, seed=0).train()
    prompts, completions = hmm_task.sample_pairs(config, 3, "eval")
    log_probs = hmm_task.completion_log_probs(model, prompts, completions, batch_size=2)
    assert log_probs.shape == (3, config.completion_length + 1, model.config.vocab_size)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, config.completion_length + 1, dtype=torch.float64))
    assert model.training
    input_ids, labels = hmm_task.encode_sequences(prompts, completions)
    targets = labels[:, prompts.shape[1] + 2 :]
    nll = -log_probs.gather(2, targets.unsqueeze(2)).mean()
    with torch.no_grad():
        loss = model.eval()(input_ids=input_ids, labels=labels).loss
    assert nll.item() == pytest.approx(loss.item(), rel=1e-5)


def test_validity_of_completions():
    config = hmm_task.TaskConfig()
    lang = hmm_task.language(config)
    prompts, completions = hmm_task.sample_pairs(config, 50, "eval")
    tokens = torch.cat([completions + hmm_task.WORD_OFFSET, torch.full((50, 1), hmm_task.END_ID)], 1)
    assert all(lang.is_valid(prompts, tokens.tolist()))  # samples of p* are valid
    assert not any(lang.is_valid(prompts, tokens[:, 1:].tolist()))  # one word short
    too_long = torch.cat([completions + hmm_task.WORD_OFFSET, tokens[:, -2:]], 1)
    assert not any(lang.is_valid(prompts, too_long.tolist()))
    special = tokens.clone()
    special[:, 3] = hmm_task.SPECIAL_TOKENS.index(hmm_task.PAD)
    assert not any(lang.is_valid(prompts, special.tolist()))
    noise = torch.randint(0, config.n_words, completions.shape, generator=torch.Generator().manual_seed(0))
    assert sum(lang.is_valid(prompts, torch.cat([noise + hmm_task.WORD_OFFSET, tokens[:, -1:]], 1).tolist())) == 0


def test_positions_mix_near_deterministic_and_high_entropy():
    config = hmm_task.TaskConfig()
    prompts, completions = hmm_task.sample_pairs(config, 500, "eval")
    entropy = hmm_task.language(config).entropy_per_token(prompts, completions)
    assert (entropy < 0.1).float().mean() > 0.03
    assert (entropy > 1.0).float().mean() > 0.3


def test_tokenizer_and_encodings_agree_with_the_chat_template():
    config = hmm_task.TaskConfig()
    tokenizer = hmm_task.make_tokenizer(config.n_words)
    assert len(tokenizer) == config.n_words + 5
    prompts, completions = hmm_task.sample_pairs(config, 3, "train")
    input_ids, labels = hmm_task.encode_sequences(prompts, completions)
    data = hmm_task.sft_dataset(prompts, completions, format="messages")
    for i, row in enumerate(data):
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        assert list(rendered)[: input_ids.shape[1]] == input_ids[i].tolist()
    hmm_task.encode_prompts(prompts, tokenizer)  # checks the rendering itself
    assert (labels[:, : config.prompt_length + 2] == -100).all()
    assert hmm_task.decode_words(input_ids[0, config.prompt_length + 2 :].tolist(), config.n_words) == (
        hmm_task.words_text(completions[0].tolist()))


def test_sampling_is_seeded_and_greedy_is_deterministic():
    config = hmm_task.TaskConfig()
    tokenizer = hmm_task.make_tokenizer(config.n_words)
    from trl_distill.testing import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, seed=0)
    prompts, _ = hmm_task.sample_pairs(config, 8, "eval")

    def draw(seed):
        return hmm_task.sample_completions(model, config, prompts, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    greedy = hmm_task.sample_completions(model, config, prompts)
    assert greedy.shape == (8, config.completion_length + 1)
    assert torch.equal(greedy, hmm_task.sample_completions(model, config, prompts))


FINGERPRINT = """
import hashlib, sys, torch
from trl_distill import hmm_task  # the package imports its trainers lazily: this loads the task module alone
assert "trl" not in sys.modules
config = hmm_task.TaskConfig()
lang = hmm_task.language(config)
digest = hashlib.sha256()
for t in (lang.initial, lang.transition, lang.emission, *hmm_task.sample_pairs(config, 300, "train", seed=2),
          *hmm_task.sample_pairs(config, 300, "eval")):
    digest.update(t.numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_processes_build_identical_tasks_and_data():
    # A different global torch seed in each process must not matter: every draw uses its own generator.
    outputs = {
        subprocess.run([sys.executable, "-c", f"import torch; torch.manual_seed({seed})\n"
                        + FINGERPRINT],
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in (1, 2)
    }
    assert len(outputs) == 1
    config = hmm_task.TaskConfig()
    lang = hmm_task.language(config)
    digest = hashlib.sha256()
    for t in (lang.initial, lang.transition, lang.emission, *hmm_task.sample_pairs(config, 300, "train", seed=2),
              *hmm_task.sample_pairs(config, 300, "eval")):
        digest.update(t.numpy().tobytes())
    assert outputs == {digest.hexdigest()}


def test_splits_and_seeds_draw_different_data():
    config = hmm_task.TaskConfig()
    train0, _ = hmm_task.sample_pairs(config, 100, "train", seed=0)
    train1, _ = hmm_task.sample_pairs(config, 100, "train", seed=1)
    held_out, _ = hmm_task.sample_pairs(config, 100, "eval")
    assert not torch.equal(train0, train1) and not torch.equal(train0, held_out)


def test_task_key_names_every_parameter():
    assert hmm_task.TaskConfig().key() == hmm_task.TaskConfig().key()
    assert hmm_task.TaskConfig(seed=1).key() != hmm_task.TaskConfig().key()
    assert hmm_task.TaskConfig(completion_length=16).key() != hmm_task.TaskConfig().key()


def reachable_impossible(lang: hmm_task.HMMLanguage, words: list[int], noise: list[bool]) -> list[bool]:
    """`impossible_words` by sets of possible hidden states (no probabilities): a word is impossible when no
    possible state emits it, and is then skipped (every successor of a possible state becomes possible)."""
    possible, out = {s for s in range(lang.config.n_states) if lang.initial[s] > 0}, []
    for word, is_noise in zip(words, noise):
        emitting = {s for s in possible if lang.emission[s, word] > 0}
        out.append(is_noise or not emitting)
        kept = possible if out[-1] else emitting
        possible = {b for a in kept for b in range(lang.config.n_states) if lang.transition[a, b] > 0}
    return out


def test_impossible_words_skip_each_mistake_and_match_the_sets_of_possible_states():
    lang = hmm_task.language(TINY)
    generator = torch.Generator().manual_seed(3)
    words = torch.randint(0, TINY.n_words, (300, 8), generator=generator)  # random words: many mistakes
    noise = torch.rand(300, 8, generator=generator) < 0.1
    judged = lang.impossible_words(words, noise)
    assert 0.1 < judged.float().mean() < 0.9
    for row in range(300):
        assert judged[row].tolist() == reachable_impossible(lang, words[row].tolist(), noise[row].tolist())


def test_one_wrong_word_in_a_sample_of_p_star_is_one_mistake():
    config = hmm_task.TaskConfig()
    lang = hmm_task.language(config)
    prompts, completions = hmm_task.sample_pairs(config, 200, "eval")
    tokens = torch.cat([completions + hmm_task.WORD_OFFSET, torch.full((200, 1), hmm_task.END_ID)], 1)
    assert not hmm_task.mistakes(config, prompts, tokens).any()
    position = 5
    probs = lang.next_word_probs(torch.cat([prompts, completions[:, : position + 1]], 1))[:, -1]
    wrong = tokens.clone()
    wrong[:, position] = (probs <= 0).double().argmax(1) + hmm_task.WORD_OFFSET  # a word p* cannot emit there
    judged = hmm_task.mistakes(config, prompts, wrong)
    assert judged[:, position].all() and judged.sum() == 200  # the words after it are judged on their own
    assert not any(lang.is_valid(prompts, wrong.tolist()))  # validity, by contrast, loses the whole completion
    special = tokens.clone()
    special[:, position] = hmm_task.SPECIAL_TOKENS.index(hmm_task.PAD)
    assert hmm_task.mistakes(config, prompts, special).sum(1).tolist() == [1] * 200


def test_mistake_rates_split_clean_prefixes_from_the_positions_after_a_mistake():
    mistakes = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rates = hmm_task.mistake_rates(mistakes)
    assert rates["mistake_rate"] == pytest.approx(4 / 15)
    assert rates["first_mistake_rate"] == pytest.approx(3 / (2 + 5 + 1))  # positions up to and at the first mistake
    assert rates["after_mistake_rate"] == pytest.approx(1 / (3 + 4))
    late = hmm_task.mistake_rates(mistakes, start=2)  # judged from position 2 on
    assert late["first_mistake_rate"] == pytest.approx(2 / (2 + 3 + 3))
    assert late["after_mistake_rate"] == pytest.approx(0 / 1)
    assert math.isnan(hmm_task.mistake_rates(torch.zeros(2, 3, dtype=torch.bool))["after_mistake_rate"])


def test_completions_continue_a_given_prefix_as_the_model_would():
    config = hmm_task.TaskConfig()
    from trl_distill.testing import tiny_causal_lm

    model = tiny_causal_lm(hmm_task.make_tokenizer(config.n_words), hidden_size=16, num_layers=1, seed=0)
    prompts, completions = hmm_task.sample_pairs(config, 6, "eval")
    k = 4
    tokens = hmm_task.sample_completions(model, config, prompts, completion_prefix=completions[:, :k])
    assert tokens.shape == (6, config.completion_length + 1)
    assert torch.equal(tokens[:, :k], completions[:, :k] + hmm_task.WORD_OFFSET)
    input_ids = torch.cat([hmm_task.encode_prompts(prompts), tokens[:, :-1]], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :, : config.n_words + hmm_task.WORD_OFFSET]
    first = prompts.shape[1] + 1  # the <|assistant|> position predicts the first completion token
    assert torch.equal(logits[:, first + k :].argmax(-1), tokens[:, k:])  # greedy, step by step
    with pytest.raises(ValueError, match="completion_prefix"):
        hmm_task.sample_completions(model, config, prompts, completion_prefix=completions[:2])


def test_injected_mistakes_are_judged_after_the_injection_only():
    config = hmm_task.TaskConfig()
    from trl_distill.testing import tiny_causal_lm

    model = tiny_causal_lm(hmm_task.make_tokenizer(config.n_words), hidden_size=16, num_layers=1, seed=0)
    prompts, completions = hmm_task.sample_pairs(config, 20, "eval")
    rates = hmm_task.injected_mistake_rates(model, config, prompts, completions, 8, torch.Generator().manual_seed(0))
    assert rates == hmm_task.injected_mistake_rates(model, config, prompts, completions, 8,
                                                    torch.Generator().manual_seed(0))
    assert rates["mistake_rate"] > 0.5  # an untrained model: mostly mistakes
    with pytest.raises(ValueError, match="position"):
        hmm_task.injected_mistake_rates(model, config, prompts, completions, config.completion_length - 1,
                                        torch.Generator())
