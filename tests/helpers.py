"""Small builders shared by tests: a tiny synthetic language, tokenizer and GPT-2."""

from __future__ import annotations

import torch

from beyondlm.config import ModelConfig
from beyondlm.data import tokenization
from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
from beyondlm.models import build_model

TINY_SPEC = LanguageSpec(n_topics=2, words_per_class=4, mean_sentences=1.5, max_len=24)


def tiny_language() -> SyntheticLanguage:
    return SyntheticLanguage.build(TINY_SPEC)


def tiny_setup(seed: int = 0, n_embd: int = 32):
    """(language, tokenizer, model) with a 1-layer GPT-2 over the tiny language's vocabulary."""
    language = tiny_language()
    tok = tokenization.word_tokenizer(language.vocab)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=n_embd, n_positions=32), tok)
    return language, tok, model
