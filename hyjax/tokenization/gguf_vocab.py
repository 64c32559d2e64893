"""A tokenizer written as GGUF metadata, the way llama.cpp reads it (the inverse of `gguf_bpe`).

Byte-level BPE tokenizers (SmolLM, LLaMA-3, GPT-2 style) become `tokenizer.ggml.model = "gpt2"`: the
vocabulary in id order, a type per token (added special tokens CONTROL, other added tokens
USER_DEFINED, the rest NORMAL), the merges as "left right" strings, and the pre-tokenizer's llama.cpp
name, found by comparing the tokenizer's split with each of `gguf_bpe.PRE_TOKENIZERS`. SentencePiece
tokenizers become `tokenizer.ggml.model = "llama"`: pieces, scores and sentencepiece's own piece types
(which GGUF numbers the same way). Ids the model has beyond the tokenizer's vocabulary are listed as
UNUSED `[PAD<id>]` tokens, as llama.cpp's converter does, since llama.cpp sizes the vocabulary from
the token list.
"""

from __future__ import annotations

import json
from typing import Any

import gguf
import tokenizers

from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.gguf_bpe import PRE_TOKENIZERS
from hyjax.tokenization.hf import HFTokenizer
from hyjax.tokenization.spm import SentencePieceTokenizer

_T = gguf.TokenType


class GGUFTokenizerError(ValueError):
    """The tokenizer cannot be written as GGUF metadata that llama.cpp reads the same way."""


def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` GGUF metadata of `tokenizer` for a model with `vocab_size` ids.

    Returns plain values keyed like GGUF (`tokenizer.ggml.tokens`, ...); `write_tokenizer` writes them
    with their GGUF types. Raises GGUFTokenizerError naming what llama.cpp could not reproduce.
    """
    if tokenizer.vocab_size > vocab_size:
        raise GGUFTokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                                 f"{vocab_size} embedding rows")
    if isinstance(tokenizer, HFTokenizer):
        fields = _bpe_fields(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        fields = _sentencepiece_fields(tokenizer)
    else:
        raise GGUFTokenizerError(f"{type(tokenizer).__name__} cannot be written as GGUF metadata; GGUF export "
                                 "supports tokenizer.json (byte-level BPE) and sentencepiece tokenizers")
    missing = range(len(fields["tokenizer.ggml.tokens"]), vocab_size)
    fields["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in missing]
    fields["tokenizer.ggml.token_type"] += [int(_T.UNUSED)] * len(missing)
    if "tokenizer.ggml.scores" in fields:
        fields["tokenizer.ggml.scores"] += [-1000.0] * len(missing)
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "padding_token_id": tokenizer.pad_id,
               "unknown_token_id": tokenizer.unk_id}
    fields.update({f"tokenizer.ggml.{key}": value for key, value in special.items() if value is not None})
    fields["tokenizer.ggml.add_bos_token"] = tokenizer.add_bos_default
    fields["tokenizer.ggml.add_eos_token"] = False
    if tokenizer.chat_template is not None:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def write_tokenizer(writer: gguf.GGUFWriter, fields: dict[str, Any]) -> None:
    """Adds `tokenizer_fields`' metadata to `writer` with the types llama.cpp expects."""
    for key, value in fields.items():
        if key == "tokenizer.ggml.token_type":
            writer.add_array(key, value)  # int32, llama_token_type
        elif key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(v) for v in value])
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def _bpe_fields(tokenizer: HFTokenizer) -> dict[str, Any]:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise GGUFTokenizerError(f"the tokenizer is a {model.get('type')} model with a {decoder} decoder; GGUF "
                                 "export writes byte-level BPE (tokenizer.json with a ByteLevel decoder) or "
                                 "sentencepiece tokenizers")
    if spec.get("normalizer") is not None:
        raise GGUFTokenizerError(f"the tokenizer normalizes text ({spec['normalizer'].get('type')}), which "
                                 "llama.cpp's byte-level BPE does not do")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges", False)))
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        tokens.append(tokenizer.id_to_token(i))
        types.append(int(_T.NORMAL if i not in added else _T.CONTROL if added[i].special else _T.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def _pre_tokenizer_name(pre_tokenizer: dict | None, ignore_merges: bool) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) of the split `pre_tokenizer` (tokenizer.json form) does."""
    wanted = _without_offsets(pre_tokenizer)
    for name, candidate in PRE_TOKENIZERS.items():
        if name == "default":  # llama.cpp's "default" is not GPT-2's split; name the one we mean
            continue
        probe = tokenizers.Tokenizer(tokenizers.models.BPE())
        probe.pre_tokenizer = candidate.build()
        built = json.loads(probe.to_str())["pre_tokenizer"]
        if _without_offsets(built) == wanted and candidate.ignore_merges == ignore_merges:
            return name
    raise GGUFTokenizerError(f"the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)} (ignore_merges="
                             f"{ignore_merges}) is none that llama.cpp names here; known: "
                             f"{sorted(set(PRE_TOKENIZERS) - {'default'})} (hyjax.tokenization.gguf_bpe)")


def _without_offsets(node):
    """A pre-tokenizer's JSON less `trim_offsets`, which changes offsets but never ids."""
    if isinstance(node, dict):
        return {k: _without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_offsets(v) for v in node]
    return node


def _sentencepiece_fields(tokenizer: SentencePieceTokenizer) -> dict[str, Any]:
    processor = tokenizer.processor
    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        kind = (_T.UNKNOWN if processor.is_unknown(i) else _T.CONTROL if processor.is_control(i)
                else _T.UNUSED if processor.is_unused(i) else _T.BYTE if processor.is_byte(i) else _T.NORMAL)
        types.append(int(kind))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
