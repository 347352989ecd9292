"""The benchmark task: a language whose true distribution p*(y | x) is known exactly (SPEC section 10).

A random sparse hidden Markov model, drawn from a fixed seed, emits words ``w0 .. w{n_words-1}``. A prompt is the
first ``prompt_length`` words of a sequence, its completion the next ``completion_length`` words then ``<|end|>``.
Because the model is known, the forward algorithm gives the exact conditional of every completion token,
``p*(y_t | x, y_<t)``, and the exact next-token distribution at every position. That makes two measurements exact
rather than judged:

* **forward KL(p* || student) per token**, on held-out samples of p*: at each position the full next-token KL
  ``sum_v p*(v) (log p*(v) - log q(v))`` (an unbiased estimate of the sequence-level KL divided by the number of
  completion tokens, with lower variance than the sampled-token form ``log p*(y_t) - log q(y_t)``; both are tested
  to agree);
* **validity** of the student's own samples: ``p*(y | x) > 0`` (every word reachable from the hidden states the
  prompt allows, exactly ``completion_length`` words, then ``<|end|>``).

The HMM is sparse on purpose: each hidden state moves to a few successors and emits a few words, with Dirichlet
weights, so some positions are near-deterministic and others carry more than a nat of entropy, most word sequences
are invalid (p* = 0), and a completion has many valid continuations, unlike the addition task (SPEC section 9),
whose single right answer leaves soft targets nothing to add.

Everything is drawn from seeded generators (numpy's for the HMM, ``torch.Generator`` for samples), never a global
RNG, so two processes build identical tasks and data (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .models import eval_mode
from .task_tokenizer import word_level_tokenizer

PAD, UNK, USER, ASSISTANT, END = "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, USER, ASSISTANT, END)

# One line; the assistant's words *and* <|end|> sit inside {% generation %} so TRL's assistant-only loss trains the
# model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER + " {{ message['content'] }} "
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + " {% generation %}{{ message['content'] }} " + END
    + "{% endgeneration %} "
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + " {%- endif -%}"
)


def make_tokenizer(n_words: int, model_max_length: int = 1 << 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the 5 special tokens (ids 0-4), then ``w0 .. w{n_words-1}`` (ids 5 ..).

    Words are whitespace separated, one token each, nothing is prepended; ``<|end|>`` is the EOS. Pads on the right
    (training); pass ``padding_side="left"`` when batching prompts for generation.
    """
    return word_level_tokenizer(SPECIAL_TOKENS, [f"w{i}" for i in range(n_words)], pre_tokenizers.WhitespaceSplit(),
                                CHAT_TEMPLATE, pad=PAD, unk=UNK, end=END, model_max_length=model_max_length)


WORD_OFFSET = len(SPECIAL_TOKENS)  # token id of word 0
END_ID = SPECIAL_TOKENS.index(END)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Everything that defines the task; `key()` names caches (teachers) built from it.

    > The language
    - ``n_states``: hidden states; ``n_words``: observable words (the vocabulary is ``n_words + 5``);
    - ``n_successors`` / ``n_emissions``: non-zero entries per row of the transition / emission matrix;
    - ``concentration``: Dirichlet concentration of those rows (below 1: some rows near-deterministic);
    - ``seed``: draws the HMM.
    > The data
    - ``prompt_length`` / ``completion_length``: words in a prompt / a completion (then ``<|end|>``).
    """

    n_states: int = 32
    n_words: int = 64
    n_successors: int = 3
    n_emissions: int = 3
    concentration: float = 0.2
    prompt_length: int = 8
    completion_length: int = 32
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _sparse_stochastic(rng: np.random.Generator, rows: int, cols: int, nonzero: int, alpha: float) -> np.ndarray:
    """A ``rows x cols`` row-stochastic matrix with ``nonzero`` Dirichlet(alpha) entries per row at random columns."""
    if not 1 <= nonzero <= cols:
        raise ValueError(f"nonzero={nonzero} must be between 1 and {cols}")
    matrix = np.zeros((rows, cols))
    for row in range(rows):
        columns = rng.choice(cols, size=nonzero, replace=False)
        matrix[row, columns] = rng.dirichlet(np.full(nonzero, alpha))
    return matrix


class HMMLanguage:
    """The HMM of a `TaskConfig`: ``initial`` [S], ``transition`` [S, S], ``emission`` [S, W], float64.

    Word sequences are ``LongTensor`` s of word indices ``0 .. W-1`` (not token ids; `WORD_OFFSET` converts).
    """

    def __init__(self, config: TaskConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.initial = torch.from_numpy(rng.dirichlet(np.ones(config.n_states)))
        self.transition = torch.from_numpy(
            _sparse_stochastic(rng, config.n_states, config.n_states, config.n_successors, config.concentration)
        )
        self.emission = torch.from_numpy(
            _sparse_stochastic(rng, config.n_states, config.n_words, config.n_emissions, config.concentration)
        )

    # -- sampling ----------------------------------------------------------------------------------------------
    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` word sequences of ``length`` drawn from the HMM, ``[n, length]``."""
        state = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator).squeeze(1)
        words = torch.empty(n, length, dtype=torch.long)
        for t in range(length):
            if t:
                state = torch.multinomial(self.transition[state], 1, generator=generator).squeeze(1)
            words[:, t] = torch.multinomial(self.emission[state], 1, generator=generator).squeeze(1)
        return words

    # -- exact probabilities (forward algorithm) ---------------------------------------------------------------
    def next_word_probs(self, words: torch.Tensor) -> torch.Tensor:
        """``P(w_t = v | w_<t)`` for every position t and word v: ``[n, T, W]`` (row t conditions on ``w_<t``).

        Rows after an impossible prefix (probability 0) are all zero. Filtered beliefs over hidden states are
        renormalised each step, so long sequences do not underflow.
        """
        n, length = words.shape
        out = torch.zeros(n, length, self.config.n_words, dtype=torch.float64)
        prior = self.initial.expand(n, -1)  # P(h_t | w_<t)
        for t in range(length):
            out[:, t] = prior @ self.emission
            joint = prior * self.emission[:, words[:, t]].T  # P(h_t, w_t | w_<t)
            total = joint.sum(1, keepdim=True)
            posterior = torch.where(total > 0, joint / total.clamp_min(1e-300), torch.zeros_like(joint))
            prior = posterior @ self.transition
        return out

    def token_log_probs(self, words: torch.Tensor) -> torch.Tensor:
        """``log P(w_t | w_<t)`` of each word of ``words`` ``[n, T]`` (``-inf`` where impossible)."""
        probs = self.next_word_probs(words).gather(2, words.unsqueeze(2)).squeeze(2)
        return probs.log()

    def impossible_words(self, words: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Which words of ``words`` ``[n, T]`` p* cannot emit after the words before them, each impossible word
        *skipped* so that the words after it are still judged: ``[n, T]`` bool.

        This is the limit of a channel that swaps a word for noise with vanishing probability: its posterior ignores a
        word no state can emit (the hidden chain moves on a step without it) and is p*'s own posterior otherwise. A
        sequence of p* has no impossible word; one wrong word inserted into it is one impossible word. ``noise``
        (``[n, T]`` bool) marks positions that hold no word at all (a special token): impossible, and skipped.
        """
        n, length = words.shape
        noise = torch.zeros(n, length, dtype=torch.bool) if noise is None else noise
        out = torch.zeros(n, length, dtype=torch.bool)
        prior = self.initial.expand(n, -1)  # P(h_t | the possible words before t)
        for t in range(length):
            joint = prior * self.emission[:, words[:, t]].T
            total = joint.sum(1, keepdim=True)
            skip = (total <= 0) | noise[:, t : t + 1]
            out[:, t] = skip.squeeze(1)
            posterior = torch.where(skip, prior, joint / total.clamp_min(1e-300))
            prior = posterior @ self.transition
        return out

    def completion_next_token_probs(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """p*(. | x, y_<t) over the token vocabulary at every completion position and at the end slot.

        ``[n, L + 1, V]`` with ``V = n_words + 5``: rows ``0 .. L-1`` spread over the word tokens, row ``L`` puts
        all mass on ``<|end|>`` (a completion is exactly L words long).
        """
        n, length = completions.shape
        probs = self.next_word_probs(torch.cat([prompts, completions], 1))[:, prompts.shape[1] :]
        out = torch.zeros(n, length + 1, self.config.n_words + WORD_OFFSET, dtype=torch.float64)
        out[:, :length, WORD_OFFSET:] = probs
        out[:, length, END_ID] = 1.0
        return out

    def completion_log_prob(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """``log p*(y | x)`` of word completions ``[n, L]`` (the end token has probability 1 after L words)."""
        full = self.token_log_probs(torch.cat([prompts, completions], 1))
        return full[:, prompts.shape[1] :].sum(1)

    def is_valid(self, prompts: torch.Tensor, completion_tokens: Sequence[Sequence[int]]) -> list[bool]:
        """Validity of generated completions given as token ids (what a model emits, before any padding).

        Valid: exactly ``completion_length`` word tokens, then ``<|end|>``, with ``p*(y | x) > 0``. Anything
        after the end token is ignored; a special token, a missing end or a wrong length makes it invalid.
        """
        length = self.config.completion_length
        candidates, rows = [], []
        for i, tokens in enumerate(completion_tokens):
            tokens = list(tokens)
            if len(tokens) <= length or tokens[length] != END_ID:
                continue
            words = tokens[:length]
            if all(WORD_OFFSET <= t < WORD_OFFSET + self.config.n_words for t in words):
                candidates.append([t - WORD_OFFSET for t in words])
                rows.append(i)
        valid = [False] * len(completion_tokens)
        if candidates:
            log_p = self.completion_log_prob(prompts[rows], torch.tensor(candidates))
            for i, lp in zip(rows, log_p.tolist()):
                valid[i] = lp > float("-inf")
        return valid

    def entropy_per_token(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Exact next-word entropy (nats) at each completion position of the given sequences, ``[n, L]``."""
        probs = self.next_word_probs(torch.cat([prompts, completions], 1))[:, prompts.shape[1] :]
        return -(probs * probs.clamp_min(1e-300).log()).sum(-1)


@functools.lru_cache(maxsize=8)
def language(config: TaskConfig = TaskConfig()) -> HMMLanguage:
    return HMMLanguage(config)


# ---------------------------------------------------------------------------------------------------------------
# Data in TRL's formats
# ---------------------------------------------------------------------------------------------------------------

Split = Literal["train", "eval", "teacher"]
# Each split has its own stream, so the eval set never depends on how many training samples are drawn.
_SPLIT_STREAMS = {"train": 1, "eval": 2, "teacher": 3, "preference": 4}


def split_generator(config: TaskConfig, split: str, seed: int = 0) -> torch.Generator:
    """The seeded generator of one data split (``seed`` varies it, e.g. per benchmark seed)."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + _SPLIT_STREAMS[split] * 10_007 + seed)


def sample_pairs(config: TaskConfig, n: int, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (prompt, completion) word tensors ``[n, P]``, ``[n, L]`` sampled from p* on ``split``'s stream."""
    words = language(config).sample(n, config.prompt_length + config.completion_length,
                                    split_generator(config, split, seed))
    return words[:, : config.prompt_length], words[:, config.prompt_length :]


def words_text(words: Sequence[int]) -> str:
    return " ".join(f"w{int(w)}" for w in words)


def prompt_messages(prompt: Sequence[int]) -> list[dict[str, str]]:
    return [{"role": "user", "content": words_text(prompt)}]


def completion_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


SftFormat = Literal["messages", "prompt_completion", "prompt"]


def sft_dataset(prompts: torch.Tensor, completions: torch.Tensor | Sequence[str],
                format: SftFormat = "prompt_completion") -> Dataset:
    """Conversational data for TRL: ``messages`` (GKD), ``prompt``/``completion`` (SFT) or ``prompt`` only.

    ``completions`` are word tensors, or texts (e.g. teacher samples decoded with `decode_words`). Every row keeps
    its prompt's words in ``prompt_words`` (for rewards).
    """
    if format not in ("messages", "prompt_completion", "prompt"):
        raise ValueError(f"format must be 'messages', 'prompt_completion' or 'prompt', got {format!r}")
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts.tolist()):
        row: dict[str, Any] = {"prompt_words": prompt}
        if format != "prompt":
            text = completions[i] if isinstance(completions[i], str) else words_text(completions[i].tolist())
            if format == "messages":
                row["messages"] = prompt_messages(prompt) + completion_messages(text)
            else:
                row["prompt"], row["completion"] = prompt_messages(prompt), completion_messages(text)
        else:
            row["prompt"] = prompt_messages(prompt)
        rows.append(row)
    return Dataset.from_list(rows)


def decode_words(tokens: Sequence[int], n_words: int) -> str:
    """Text of generated tokens up to the first ``<|end|>``: word tokens kept, other special tokens shown by name."""
    out = []
    for t in tokens:
        if t == END_ID:
            break
        out.append(f"w{t - WORD_OFFSET}" if WORD_OFFSET <= t < WORD_OFFSET + n_words else SPECIAL_TOKENS[t]
                   if t < WORD_OFFSET else UNK)
    return " ".join(out)


def encode_prompts(prompts: torch.Tensor, tokenizer: PreTrainedTokenizerFast | None = None) -> torch.Tensor:
    """Token ids of the chat-template prompts (``<|user|> words <|assistant|>``), all the same length, no padding.

    With ``tokenizer``, checks that its chat template renders the first prompt to the same ids.
    """
    ids = torch.empty(prompts.shape[0], prompts.shape[1] + 2, dtype=torch.long)
    ids[:, 0] = SPECIAL_TOKENS.index(USER)
    ids[:, 1:-1] = prompts + WORD_OFFSET
    ids[:, -1] = SPECIAL_TOKENS.index(ASSISTANT)
    if tokenizer is not None:
        rendered = tokenizer.apply_chat_template(prompt_messages(prompts[0].tolist()), add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if list(rendered) != ids[0].tolist():
            raise ValueError(f"the tokenizer renders the prompt as {list(rendered)}, expected {ids[0].tolist()}")
    return ids


def encode_sequences(prompts: torch.Tensor, completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` of full conversations (prompt, completion, ``<|end|>``) and ``labels`` (-100 on the prompt)."""
    prompt_ids = encode_prompts(prompts)
    end = torch.full((prompts.shape[0], 1), END_ID)
    input_ids = torch.cat([prompt_ids, completions + WORD_OFFSET, end], 1)
    labels = input_ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Measurements of a model against p*
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def completion_log_probs(model: torch.nn.Module, prompts: torch.Tensor, completions: torch.Tensor,
                         batch_size: int = 250) -> torch.Tensor:
    """The model's next-token log-probs over its whole head at each completion position and the end slot,
    ``[n, L+1, V']`` (float64, on the CPU), given word ``prompts`` ``[n, P]`` and ``completions`` ``[n, L]``; the
    model runs in eval mode and is left in the mode it was in."""
    device = next(model.parameters()).device
    input_ids, _ = encode_sequences(prompts, completions)
    first = prompts.shape[1] + 1  # the <|assistant|> position, whose logits predict the first completion token
    out = []
    with eval_mode(model):
        for i in range(0, len(input_ids), batch_size):
            logits = model(input_ids=input_ids[i : i + batch_size].to(device)).logits.float()
            out.append(torch.log_softmax(logits[:, first:-1], dim=-1).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def forward_kl(model: torch.nn.Module, config: TaskConfig, prompts: torch.Tensor, completions: torch.Tensor,
               batch_size: int = 250, sampled_token: bool = False) -> float:
    """Forward KL(p* || model) per completion token (the L words and the end token), on samples of p*.

    Default: the full next-token KL at each position, averaged over positions of the given samples of p*.
    ``sampled_token=True``: the plain Monte-Carlo form, the mean of ``log p*(y_t | .) - log q(y_t | .)``. Both are
    unbiased for ``E_{y ~ p*}[log p*(y|x) - log q(y|x)] / (L + 1)``; the first has lower variance. A head wider than
    the vocabulary keeps its extra columns in the student's softmax (mass there is mass off p*'s support).
    """
    log_q = completion_log_probs(model, prompts, completions, batch_size)
    p = language(config).completion_next_token_probs(prompts, completions)
    vocab = p.shape[-1]
    if sampled_token:
        targets = torch.cat([completions + WORD_OFFSET, torch.full((len(completions), 1), END_ID)], 1)
        log_p = p.gather(2, targets.unsqueeze(2)).squeeze(2).log()
        return (log_p - log_q.gather(2, targets.unsqueeze(2)).squeeze(2)).mean().item()
    log_q = log_q[..., :vocab]
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), torch.zeros_like(p))
    return terms.sum(-1).mean().item()


@torch.no_grad()
def sample_completions(model: torch.nn.Module, config: TaskConfig, prompts: torch.Tensor,
                       generator: torch.Generator | None = None, temperature: float = 1.0,
                       batch_size: int = 500, completion_prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Completions of ``model`` to word ``prompts``: token ids ``[n, L + 1]`` (room for L words and the end).

    ``generator=None`` decodes greedily; otherwise tokens are drawn at ``temperature`` from ``generator`` (a seeded
    ``torch.Generator``, never the global RNG, so a sample is the same in every process). All prompts have the same
    length, so no padding is needed and one KV cache serves the batch. Only the vocabulary's ids are drawn: a head
    padded wider than the tokenizer has its extra columns masked, as they decode to nothing.
    ``completion_prefix`` (words ``[n, k]``) starts every completion (the assistant's turn) with given words: the
    model continues after them, and they are the first k tokens of the result.
    """
    device = next(model.parameters()).device
    vocab = config.n_words + WORD_OFFSET
    prefix = torch.zeros(len(prompts), 0, dtype=torch.long) if completion_prefix is None else completion_prefix
    if prefix.shape[0] != len(prompts) or prefix.shape[1] > config.completion_length:
        raise ValueError(f"completion_prefix must be [{len(prompts)}, k <= {config.completion_length}], got "
                         f"{list(prefix.shape)}")
    # transformers 5.x renamed `past_key_values` to `cache` (in the forward and its output); accept either.
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            given = prefix[i : i + batch_size] + WORD_OFFSET
            input_ids = torch.cat([encode_prompts(prompts[i : i + batch_size]), given], 1).to(device)
            tokens = list(given.T)
            past = None
            for _ in range(config.completion_length + 1 - prefix.shape[1]):
                result = model(input_ids=input_ids, use_cache=True, **{cache_name: past})
                past, logits = getattr(result, cache_name), result.logits[:, -1, :vocab].float()
                if generator is None:
                    token = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1).cpu()
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
                tokens.append(token.cpu())
                input_ids = token[:, None]
            out.append(torch.stack(tokens, 1))
    return torch.cat(out)


def validity(model: torch.nn.Module, config: TaskConfig, prompts: torch.Tensor,
             generator: torch.Generator | None = None, temperature: float = 1.0) -> float:
    """Fraction of the model's completions to ``prompts`` with ``p*(y | x) > 0`` (greedy when ``generator`` is None)."""
    completions = sample_completions(model, config, prompts, generator, temperature)
    return sum(language(config).is_valid(prompts, completions.tolist())) / len(prompts)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes that can be repaired (GKD's exposure-bias argument; benchmarks/exposure_bias.py)
# ---------------------------------------------------------------------------------------------------------------


def mistakes(config: TaskConfig, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The mistakes of completions given as token ids ``[n, >= L]`` (`sample_completions`) to word ``prompts``:
    ``[n, L]`` bool over the L word positions. A mistake is a token that is no word, or a word p* cannot emit after
    the words before it, where earlier mistakes are skipped (`HMMLanguage.impossible_words`): one wrong word is one
    mistake, and the words after it are judged on their own."""
    length = config.completion_length
    tokens = tokens[:, :length]
    is_word = (tokens >= WORD_OFFSET) & (tokens < WORD_OFFSET + config.n_words)
    words = torch.where(is_word, tokens - WORD_OFFSET, torch.zeros_like(tokens))
    noise = torch.cat([torch.zeros(prompts.shape, dtype=torch.bool), ~is_word], 1)
    judged = language(config).impossible_words(torch.cat([prompts, words], 1), noise)
    return judged[:, prompts.shape[1] :]


def mistake_rates(mistakes: torch.Tensor, start: int = 0) -> dict[str, float]:
    """Rates of ``mistakes`` ``[n, L]`` over the positions from ``start`` on.

    ``mistake_rate``: the share of positions holding a mistake. ``first_mistake_rate``: the share among positions
    with no mistake before them (in range), i.e. how often a clean prefix goes wrong. ``after_mistake_rate``: the share
    among positions after a sample's first mistake, i.e. how often the model goes wrong again once off p*'s support
    (nan when no sample made a mistake before its last position).
    """
    judged = mistakes[:, start:]
    before = judged.long().cumsum(1) - judged.long()  # mistakes strictly before each position
    clean, after = before == 0, before > 0
    return {
        "mistake_rate": judged.double().mean().item(),
        "first_mistake_rate": (judged & clean).sum().item() / max(clean.sum().item(), 1),
        "after_mistake_rate": (judged & after).sum().item() / after.sum().item() if after.any() else float("nan"),
    }


def injected_mistake_rates(model: torch.nn.Module, config: TaskConfig, prompts: torch.Tensor,
                           completions: torch.Tensor, position: int, generator: torch.Generator,
                           temperature: float = 1.0) -> dict[str, float]:
    """How a model continues after a mistake it did not make: each completion of p* (``completions`` ``[n, L]``)
    keeps its first ``position`` words, then one word p* cannot emit there (drawn uniformly from ``generator``), and the
    model writes the rest at ``temperature``. Returns `mistake_rates` over the words after the injected one: the same
    prefixes for every model, so models compare on equal terms."""
    if not 0 <= position < config.completion_length - 1:
        raise ValueError(f"position must be in [0, {config.completion_length - 2}], got {position}")
    context = torch.cat([prompts, completions[:, : position + 1]], 1)
    impossible = language(config).next_word_probs(context)[:, -1] <= 0  # words p* cannot emit at `position`
    if not impossible.any(1).all():
        raise ValueError(f"some prefix allows every word at position {position}: nothing to inject")
    wrong = torch.multinomial(impossible.double(), 1, generator=generator)
    prefix = torch.cat([completions[:, :position], wrong], 1)
    tokens = sample_completions(model, config, prompts, generator, temperature, completion_prefix=prefix)
    return mistake_rates(mistakes(config, prompts, tokens), start=position + 1)
