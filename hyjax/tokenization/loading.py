"""`load_tokenizer`: pick the backend from what a path holds."""

from __future__ import annotations

import pathlib

from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.chat_templates import resolve_chat_template
from hyjax.weights.gguf_reader import read_gguf_metadata
from hyjax.tokenization.gguf_bpe import tokenizer_from_gguf_metadata
from hyjax.tokenization.hf import HFTokenizer
from hyjax.tokenization.spm import SentencePieceTokenizer

# What a folder is searched for, in order.
FOLDER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path: str | pathlib.Path, *, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer at `path`.

    Args:
      path: a `.gguf` file (its BPE vocabulary), a sentencepiece `.model` file, a `tokenizer.json`
        file, or a folder holding `tokenizer.json` (preferred) or `tokenizer.model`. A
        `tokenizer_config.json` beside a `.json`/`.model` file supplies special tokens, `add_bos_token`
        and the chat template.
      chat_template: replaces the checkpoint's chat template: a built-in name ("chatml", "zephyr",
        "llama2", "llama3") or jinja2 text.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"folder {path} holds none of {list(FOLDER_FILES)}.")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected a .gguf, a sentencepiece .model, a tokenizer.json, "
            f"or a folder holding one of {list(FOLDER_FILES)}."
        )

    suffix = path.suffix.lower()
    if suffix == ".gguf":
        tokenizer: Tokenizer = tokenizer_from_gguf_metadata(read_gguf_metadata(path))
    elif suffix == ".model":
        tokenizer = SentencePieceTokenizer.from_file(path)
    elif suffix == ".json":
        tokenizer = HFTokenizer.from_file(path)
    else:
        raise ValueError(
            f"{path}: cannot tell the tokenizer format from the suffix {suffix!r}; "
            "expected .gguf, .model (sentencepiece) or .json (Hugging Face tokenizer.json)."
        )
    if chat_template is not None:
        tokenizer = tokenizer.with_chat_template(resolve_chat_template(chat_template))
    return tokenizer
