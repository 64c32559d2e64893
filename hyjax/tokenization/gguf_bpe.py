"""Build a tokenizer from the byte-level BPE vocabulary a GGUF file carries.

A GGUF has no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), the
merges, a type per token and the special ids as metadata, and names the pre-tokenizer (the regex that
cuts text into words before BPE) by a short string, `tokenizer.ggml.pre`. We rebuild the equivalent
`tokenizers.Tokenizer`:

- model: BPE over the vocabulary and merges, byte-level (tokens are spelled in GPT-2's byte alphabet,
  `Ġ` for a space);
- pre-tokenizer: from `PRE_TOKENIZERS`, keyed by `tokenizer.ggml.pre`;
- tokens of type CONTROL (3) become special added tokens and USER_DEFINED (4) plain added tokens, so
  `<|im_start|>` written in text is one token;
- decoder: byte-level.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from hyjax.tokenization.hf import HFTokenizer

_CONTROL = gguf.TokenType.CONTROL  # 3
_USER_DEFINED = gguf.TokenType.USER_DEFINED  # 4

# LLaMA-3's split regex (from its tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(c) for byte, c in zip(printable, chars)}


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


@dataclasses.dataclass(frozen=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` value splits text.

    Attributes:
      build: makes the `tokenizers` pre-tokenizer.
      ignore_merges: a word that is itself in the vocabulary is one token without running merges
        (llama.cpp and LLaMA-3's `tokenizer.json` both do this for LLaMA-3).
    """

    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False


_GPT2 = PreTokenizerSpec(lambda: _byte_level(use_regex=True))
_LLAMA3 = PreTokenizerSpec(
    lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), _byte_level(False)]),
    ignore_merges=True,
)

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    # SmolLM: every digit on its own, then GPT-2's regex.
    "smollm": PreTokenizerSpec(
        lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])
    ),
}


def _required(fields: Mapping[str, Any], key: str) -> Any:
    if key not in fields:
        raise ValueError(f"GGUF metadata has no {key!r}; the file carries no complete BPE tokenizer.")
    return fields[key]


def _vocab(tokens: Sequence[str], token_types: Sequence[int]) -> dict[str, int]:
    """Token text to id. Ordinary tokens not spelled in the byte alphabet are respelled into it."""
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types, strict=True)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        if token in vocab:
            raise ValueError(f"GGUF vocabulary lists {token!r} twice (ids {vocab[token]} and {i}).")
        vocab[token] = i
    return vocab


def _merges(raw: Sequence[str]) -> list[tuple[str, str]]:
    merges = []
    for i, merge in enumerate(raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by one space.")
        merges.append((parts[0], parts[1]))
    return merges


def _optional_id(fields: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < vocab_size:
        raise ValueError(f"GGUF metadata {key} = {value} is outside the vocabulary [0, {vocab_size}).")
    return value


def tokenizer_from_gguf_metadata(fields: Mapping[str, Any]) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata.

    Args:
      fields: metadata as plain Python values,
        `{k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}`.

    Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, LLaMA-3, GPT-2 style)
    are supported; the pre-tokenizer must be one of `PRE_TOKENIZERS`. A missing
    `tokenizer.ggml.pre` means "default", as in llama.cpp.
    """
    model = _required(fields, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model = {model!r} is not supported; only 'gpt2' (byte-level BPE) vocabularies "
            "can be built from GGUF metadata. For a sentencepiece ('llama') vocabulary load the model's "
            "tokenizer.model or tokenizer.json instead."
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre = {pre!r} is not supported; supported pre-tokenizers: {sorted(PRE_TOKENIZERS)}. "
            "Load the model's tokenizer.json instead, or add its split to hyjax.tokenization.gguf_bpe.PRE_TOKENIZERS."
        )
    spec = PRE_TOKENIZERS[pre]
    tokens = list(_required(fields, "tokenizer.ggml.tokens"))
    token_types = list(fields.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens)))
    merges = _merges(_required(fields, "tokenizer.ggml.merges"))

    backend = tokenizers.Tokenizer(
        models.BPE(vocab=_vocab(tokens, token_types), merges=merges, fuse_unk=False, ignore_merges=spec.ignore_merges)
    )
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
    )
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"rebuilt GGUF vocabulary has {backend.get_vocab_size(with_added_tokens=True)} ids, "
            f"the file lists {len(tokens)}; the metadata is inconsistent."
        )

    size = len(tokens)
    template = fields.get("tokenizer.chat_template")
    return HFTokenizer(
        backend,
        bos_id=_optional_id(fields, "tokenizer.ggml.bos_token_id", size),
        eos_id=_optional_id(fields, "tokenizer.ggml.eos_token_id", size),
        pad_id=_optional_id(fields, "tokenizer.ggml.padding_token_id", size),
        unk_id=_optional_id(fields, "tokenizer.ggml.unknown_token_id", size),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=str(template) if template is not None else None,
    )
