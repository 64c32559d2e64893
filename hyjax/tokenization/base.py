"""The `Tokenizer` every backend implements: ids, special tokens, chat templates, export."""

from __future__ import annotations

import abc
import copy
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from hyjax.tokenization.chat import render_chat_template
from hyjax.tokenization.hf_config import TokenizerConfig

# Special tokens that end a turn in the chat formats we know. Any of them that the vocabulary marks
# as special joins `stop_ids`, beside `eos_id` (llama.cpp's "end of generation" set does the same).
END_OF_TURN_TOKENS = (
    "<|eot_id|>",  # LLaMA-3 instruct
    "<|eom_id|>",  # LLaMA-3.1 tool calls
    "<|end_of_text|>",  # LLaMA-3 base
    "<|im_end|>",  # ChatML
    "<|endoftext|>",  # GPT-2 family, SmolLM
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
    "</s>",  # LLaMA-2, TinyLlama
)


class Tokenizer(abc.ABC):
    """Text to token ids and back, with the special tokens and chat template of one checkpoint.

    Backends implement the abstract methods; this class adds BOS handling, the chat template and the
    stop set on top. Special tokens written in the text (for example `<|im_start|>`) encode to their
    single id, as in transformers, so a rendered chat template encodes correctly.

    Args:
      bos_id: id of the beginning-of-sequence token, or None if the vocabulary has none.
      eos_id: id that ends a sequence; for chat models the one that ends an assistant turn.
      pad_id: id the checkpoint names for padding, or None (then `pad_id` falls back to `eos_id`).
      unk_id: id of the unknown token, or None.
      add_bos: whether `encode` prepends BOS when its caller does not say.
      chat_template: jinja2 chat template, or None.
    """

    def __init__(
        self,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        unk_id: int | None,
        add_bos: bool,
        chat_template: str | None,
    ):
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True but the vocabulary has no BOS token; pass add_bos=False.")
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._unk_id = unk_id
        self._add_bos = add_bos
        self._chat_template = chat_template

    # ---- backend interface -------------------------------------------------------------------

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text` without any BOS/EOS added; special tokens in the text map to their id."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of `ids`."""

    @abc.abstractmethod
    def _special_tokens(self) -> Mapping[str, int]:
        """Text to id of every special (control) token in the vocabulary."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids run from 0 to vocab_size - 1)."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as the backend spells it (byte-level BPE keeps `Ġ`)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry `token`, or None when there is none."""

    @abc.abstractmethod
    def save_hf(self, folder: str | pathlib.Path) -> pathlib.Path:
        """Write the tokenizer in Hugging Face layout so `AutoTokenizer.from_pretrained(folder)` loads it.

        Returns the folder. Writes `tokenizer_config.json` (special tokens, `add_bos_token`,
        `chat_template`) beside the backend's own file.
        """

    # ---- common API --------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        Args:
          text: the text; special tokens written in it encode to their own id.
          add_bos: prepend BOS; None uses the checkpoint's default (`add_bos_default`).
        """
        if not isinstance(text, str):
            raise TypeError(
                f"encode expects a str, got {type(text).__name__}; encode a batch with a list comprehension."
            )
        ids = self._encode_text(text)
        if self._add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token; call encode(text, add_bos=False).")
            ids = [self._bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (any iterable of integers, numpy and jax arrays included).

        Args:
          ids: token ids.
          skip_special_tokens: leave out special tokens such as BOS, EOS and `<|im_start|>`.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        return self._decode_ids(ids, skip_special_tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the vocabulary has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id; for chat models the id that ends an assistant turn."""
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        """Padding id: the checkpoint's own, else `eos_id` (padding is masked out anyway)."""
        return self._pad_id if self._pad_id is not None else self._eos_id

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, or None."""
        return self._unk_id

    @property
    def add_bos_default(self) -> bool:
        """Whether `encode(text)` prepends BOS when `add_bos` is not given."""
        return self._add_bos

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: `eos_id` plus the end-of-turn tokens the vocabulary has as special."""
        special = self._special_tokens()
        stops = {special[t] for t in END_OF_TURN_TOKENS if t in special}
        if self._eos_id is not None:
            stops.add(self._eos_id)
        return frozenset(stops)

    @property
    def chat_template(self) -> str | None:
        """The jinja2 chat template, or None when the checkpoint carries none."""
        return self._chat_template

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """A copy of this tokenizer that uses `chat_template` (jinja2 text) instead of its own."""
        other = copy.copy(self)
        other._chat_template = chat_template
        return other

    def _hf_tokenizer_config(self) -> TokenizerConfig:
        """Special tokens, BOS policy and chat template as `tokenizer_config.json` records them."""
        return TokenizerConfig(
            bos_token=self._token_text(self.bos_id),
            eos_token=self._token_text(self.eos_id),
            pad_token=self._token_text(self._pad_id),
            unk_token=self._token_text(self.unk_id),
            add_bos_token=self.add_bos_default,
            chat_template=self.chat_template,
        )

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text with the chat template, the way transformers does.

        Args:
          messages: dicts with at least `role` and `content`.
          add_generation_prompt: end with the header that opens an assistant turn.
        """
        if self._chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template; pass one with load_tokenizer(path, chat_template=NAME) "
                "or tokenizer.with_chat_template(builtin_chat_template(NAME)) (names: chatml, zephyr, llama2, llama3)."
            )
        return render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self._bos_id),
            eos_token=self._token_text(self._eos_id),
            pad_token=self._token_text(self._pad_id),
            unk_token=self._token_text(self._unk_id),
        )
