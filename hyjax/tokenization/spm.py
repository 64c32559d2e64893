"""Backend over a sentencepiece `.model` file (LLaMA-2, TinyLlama)."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping

import sentencepiece

from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.hf_config import read_tokenizer_config, write_tokenizer_config


def _id_or_none(value: int) -> int | None:
    return None if value < 0 else value


class SentencePieceTokenizer(Tokenizer):
    """A `Tokenizer` backed by a `sentencepiece.SentencePieceProcessor`.

    Control pieces (`<s>`, `</s>`) and the unknown piece written in the text encode to their own id;
    the text between them is encoded by sentencepiece piece by piece, each piece with its dummy-prefix
    space (Hugging Face's "legacy" LLaMA behaviour, which TinyLlama and LLaMA-2 were tuned with).

    Args:
      processor: the loaded sentencepiece model.
      add_bos: prepend BOS by default (LLaMA-2 style: True).
      eos_id: end-of-turn id if it is not the model's own `</s>`.
      pad_id: padding id if the model defines none.
      chat_template: jinja2 chat template, or None.
    """

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        *,
        add_bos: bool = True,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        super().__init__(
            bos_id=_id_or_none(processor.bos_id()),
            eos_id=eos_id if eos_id is not None else _id_or_none(processor.eos_id()),
            pad_id=pad_id if pad_id is not None else _id_or_none(processor.pad_id()),
            unk_id=_id_or_none(processor.unk_id()),
            add_bos=add_bos,
            chat_template=chat_template,
        )
        self._processor = processor
        self._specials = {
            processor.id_to_piece(i): i
            for i in range(processor.get_piece_size())
            if processor.is_control(i) or processor.is_unknown(i)
        }
        # Longest first, so a special token that contains another one wins.
        names = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> SentencePieceTokenizer:
        """Load a `.model` file, with the `tokenizer_config.json` beside it if there is one.

        The config can name the EOS and pad tokens, set `add_bos_token` (default True) and carry the
        chat template.
        """
        path = pathlib.Path(path)
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        config = read_tokenizer_config(path.parent)

        def piece_id(key: str) -> int | None:
            text = getattr(config, key)
            if text is None:
                return None
            found = processor.piece_to_id(text)
            if processor.id_to_piece(found) != text:
                raise ValueError(
                    f"{path.parent / 'tokenizer_config.json'}: {key} {text!r} is not a piece of {path}; "
                    "fix the config or remove the entry."
                )
            return found

        return cls(
            processor,
            add_bos=True if config.add_bos_token is None else config.add_bos_token,
            eos_id=piece_id("eos_token"),
            pad_id=piece_id("pad_token"),
            chat_template=config.chat_template,
        )

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        """The underlying `SentencePieceProcessor`."""
        return self._processor

    def _encode_text(self, text: str) -> list[int]:
        chunks = self._split.split(text) if self._split is not None else [text]
        ids: list[int] = []
        for chunk in chunks:
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids.extend(self._processor.encode(chunk))
        return ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        special_ids = set(self._specials.values())
        if skip_special_tokens:
            return self._processor.decode([i for i in ids if i not in special_ids])
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in special_ids:
                if run:
                    parts.append(self._processor.decode(run))
                    run = []
                parts.append(self._processor.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._processor.decode(run))
        return "".join(parts)

    def _special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"id {token_id} is not in the vocabulary (size {self.vocab_size}).")
        return self._processor.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        found = self._processor.piece_to_id(token)
        return found if self._processor.id_to_piece(found) == token else None

    def save_hf(self, folder: str | pathlib.Path) -> pathlib.Path:
        """Write `tokenizer.model` and a `tokenizer_config.json` naming `LlamaTokenizer` into `folder`.

        transformers rebuilds a LLaMA-style BPE from `tokenizer.model` (byte fallback, no text
        normalization, a dummy prefix space), so only such models are written; others raise
        ValueError. The config sets `legacy: true`: a dummy prefix after every special token, as here.
        One difference remains, in transformers: text that already starts with a space gets no
        second prefix space there, while sentencepiece adds one.
        """
        self._check_llama_style()
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(self._processor.serialized_model_proto())
        write_tokenizer_config(
            folder,
            "LlamaTokenizer",
            self._hf_tokenizer_config(),
            extra={"legacy": True},
        )
        return folder

    def _check_llama_style(self) -> None:
        """Raise ValueError unless transformers' `LlamaTokenizer` reproduces this model."""
        from sentencepiece import sentencepiece_model_pb2  # deferred: protobuf, needed only by this check

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._processor.serialized_model_proto())
        trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
        problems = []
        if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
            kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
            problems.append(f"model_type is {kind}, not BPE")
        if not trainer.byte_fallback:
            problems.append("byte_fallback is off")
        if normalizer.name != "identity" or normalizer.remove_extra_whitespaces:
            problems.append(
                f"text is normalized (normalization_rule_name={normalizer.name!r}, "
                f"remove_extra_whitespaces={normalizer.remove_extra_whitespaces})"
            )
        if not normalizer.add_dummy_prefix:
            problems.append("add_dummy_prefix is off")
        if problems:
            raise ValueError(
                "cannot save this sentencepiece model for transformers' LlamaTokenizer, which would tokenize it "
                f"differently: {'; '.join(problems)}. LLaMA-style models are trained with model_type='bpe', "
                "byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False."
            )
