"""Tokenizers for LLaMA-family checkpoints: GGUF BPE vocabularies, sentencepiece and `tokenizer.json`.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
"""

from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.chat import render_chat_template
from hyjax.tokenization.chat_templates import BUILTIN_CHAT_TEMPLATES, builtin_chat_template
from hyjax.tokenization.gguf_bpe import PRE_TOKENIZERS, tokenizer_from_gguf_metadata
from hyjax.tokenization.hf import HFTokenizer
from hyjax.tokenization.loading import load_tokenizer
from hyjax.tokenization.spm import SentencePieceTokenizer

__all__ = [
    "BUILTIN_CHAT_TEMPLATES",
    "PRE_TOKENIZERS",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "builtin_chat_template",
    "load_tokenizer",
    "render_chat_template",
    "tokenizer_from_gguf_metadata",
]
