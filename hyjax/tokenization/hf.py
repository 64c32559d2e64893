"""Backend over a `tokenizers.Tokenizer`: Hugging Face `tokenizer.json` files and GGUF BPE vocabularies."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import tokenizers
from tokenizers import processors

from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.hf_config import read_tokenizer_config, write_tokenizer_config

_PROBE_TEXT = "Hello world"


def _adds_only_bos(backend: tokenizers.Tokenizer, bos_id: int | None, add_bos: bool) -> bool:
    """Whether the backend's post-processor adds exactly what `add_bos` says: BOS in front, nothing else."""
    plain = backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
    with_special = backend.encode(_PROBE_TEXT, add_special_tokens=True).ids
    return with_special == ([bos_id] if add_bos else []) + plain


class HFTokenizer(Tokenizer):
    """A `Tokenizer` backed by a `tokenizers.Tokenizer`.

    `encode` never runs the backend's post-processor: BOS is added by `Tokenizer.encode` alone, so
    `add_bos` means the same for every backend. Truncation and padding settings stored in a
    `tokenizer.json` are switched off.

    Args:
      backend: the `tokenizers.Tokenizer` (copied, not modified).
      **kwargs: special ids, `add_bos` and `chat_template`, as for `Tokenizer`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, **kwargs):
        super().__init__(**kwargs)
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._specials = {t.content: i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> HFTokenizer:
        """Load a `tokenizer.json`, with the `tokenizer_config.json` beside it if there is one.

        The config gives the special tokens, `add_bos_token` and the chat template. Without
        `add_bos_token` the default follows the tokenizer's own post-processor (LLaMA-3's adds BOS).
        """
        path = pathlib.Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises bare Exceptions for files it cannot parse
            raise ValueError(f"cannot read the tokenizer {path}: {err}") from err
        config = read_tokenizer_config(path.parent)

        def token_id(key: str) -> int | None:
            text = getattr(config, key)
            if text is None:
                return None
            found = backend.token_to_id(text)
            if found is None:
                raise ValueError(
                    f"{path.parent / 'tokenizer_config.json'}: {key} {text!r} is not in the vocabulary of {path}; "
                    "fix the config or remove the entry."
                )
            return found

        bos_id = token_id("bos_token")
        add_bos = config.add_bos_token
        if add_bos is None:
            add_bos = bos_id is not None and _adds_only_bos(backend, bos_id, True)
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            unk_id=token_id("unk_token"),
            add_bos=add_bos,
            chat_template=config.chat_template,
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def _encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"id {token_id} is not in the vocabulary (size {self.vocab_size}).")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def save_hf(self, folder: str | pathlib.Path) -> pathlib.Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (created if needed).

        The saved post-processor adds BOS exactly when `add_bos_default` is true, so tools that read
        `tokenizer.json` alone agree with `encode(text)` too.
        """
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        if not _adds_only_bos(backend, self.bos_id, self.add_bos_default):
            if self.add_bos_default:
                bos = self.id_to_token(self.bos_id)
                backend.post_processor = processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)]
                )
            else:
                backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        backend.save(str(folder / "tokenizer.json"))
        write_tokenizer_config(
            folder,
            "PreTrainedTokenizerFast",
            self._hf_tokenizer_config(),
        )
        return folder
