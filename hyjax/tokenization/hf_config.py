"""Read and write the `tokenizer_config.json` that sits beside a Hugging Face tokenizer."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` we use; a field is None where the file does not say."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None
    chat_template: str | None = None


def _token_text(value: Any, key: str, path: pathlib.Path) -> str | None:
    """A special token entry: a string, an AddedToken dict `{"content": ...}`, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key} = {value!r} is neither a string nor an AddedToken dict with 'content'.")


def _chat_template(value: Any, path: pathlib.Path) -> str | None:
    """A chat template entry: a string, or a list of `{"name", "template"}` of which we take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{path}: chat_template lists {sorted(named)} but no 'default' template.")
    raise ValueError(f"{path}: chat_template is a {type(value).__name__}, expected a string or a list of templates.")


def read_tokenizer_config(folder: pathlib.Path) -> TokenizerConfig:
    """The `tokenizer_config.json` in `folder` (empty config if absent).

    A `chat_template.jinja` file in the folder (how newer transformers saves templates) is used when
    the JSON carries no template.
    """
    path = folder / "tokenizer_config.json"
    raw: dict[str, Any] = {}
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
    template = _chat_template(raw.get("chat_template"), path)
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    add_bos = raw.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(f"{path}: add_bos_token = {add_bos!r} must be true or false.")
    return TokenizerConfig(
        bos_token=_token_text(raw.get("bos_token"), "bos_token", path),
        eos_token=_token_text(raw.get("eos_token"), "eos_token", path),
        pad_token=_token_text(raw.get("pad_token"), "pad_token", path),
        unk_token=_token_text(raw.get("unk_token"), "unk_token", path),
        add_bos_token=add_bos,
        chat_template=template,
    )


def write_tokenizer_config(
    folder: pathlib.Path, tokenizer_class: str, config: TokenizerConfig, extra: Mapping[str, Any] | None = None
) -> None:
    """Write `tokenizer_config.json` for `tokenizer_class`; BOS is added only as `add_bos_token` says.

    `extra` holds class-specific keys (for example `legacy` for `LlamaTokenizer`).
    """
    raw: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": bool(config.add_bos_token),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **(extra or {}),
    }
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(config, key)
        if value is not None:
            raw[key] = value
    if config.chat_template is not None:
        raw["chat_template"] = config.chat_template
    text = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
