"""Tokenizers, all as ``PreTrainedTokenizerFast`` so every stage loads them the same way.

- ``word``: the synthetic language's exact vocabulary (id i = ``language.vocab[i]``), so model
  log-probs and the exact log p_d score the same token sequences.
- ``bpe``: byte-level BPE trained on the train split (``tokenizers``).
- ``pretrained``: a hub/local tokenizer, for fine-tuning a pretrained model.
BOS = EOS = PAD = ``<|endoftext|>`` (the GPT-2 convention); padding is always masked.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from beyondlm.inputs import reading

EOS = "<|endoftext|>"
UNK = "<unk>"


def _wrap(tok: Tokenizer, unk: str | None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=unk
    )


def word_tokenizer(vocab: Sequence[str]) -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer whose ids are the positions in ``vocab``."""
    if vocab[0] != EOS or UNK not in vocab:
        raise ValueError(f"vocab must start with {EOS!r} and contain {UNK!r}")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return _wrap(tok, UNK)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, None)


def pretrained_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    with reading(name_or_path, "tokenizer", "set prepare.tokenizer.name_or_path to a tokenizer directory or hub id"):
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_texts(tok: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """``[BOS] + tokens + [EOS]``; a text longer than ``max_len`` tokens (EOS counted) keeps its
    first ``max_len`` tokens and no EOS (it did not end there)."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return [[bos, *x, eos] if len(x) < max_len else [bos, *x[:max_len]] for x in ids]
