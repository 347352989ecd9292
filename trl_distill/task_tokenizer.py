"""Offline tokenizers for the two built-in tasks (`addition`, `hmm_task`): a fixed token list, no download.

Each token of the list is one id (special tokens first, registered as added tokens, which is where TRL looks the
end-of-turn token up); nothing is prepended on encoding (no BOS); the end token is the EOS and the pad token pads on
the right (training). Pass ``padding_side="left"`` when batching prompts for generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, models
from tokenizers.decoders import Decoder
from tokenizers.pre_tokenizers import PreTokenizer
from transformers import PreTrainedTokenizerFast


def word_level_tokenizer(
    special_tokens: Sequence[str],
    tokens: Sequence[str],
    pre_tokenizer: PreTokenizer,
    chat_template: str,
    *,
    pad: str,
    unk: str,
    end: str,
    model_max_length: int,
    decoder: Decoder | None = None,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` whose ids are ``special_tokens`` then ``tokens``, in order.

    ``pre_tokenizer`` splits text into pieces that are each one entry of the list (unknown pieces become ``unk``);
    ``decoder`` joins them back (default: with spaces).
    """
    vocab = {token: i for i, token in enumerate((*special_tokens, *tokens))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        backend.decoder = decoder
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=unk,
        eos_token=end,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer
