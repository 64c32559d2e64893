"""Render jinja2 chat templates the way transformers' `apply_chat_template` does.

Same environment: a sandbox (templates from checkpoints are untrusted), `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape HTML, and the
`raise_exception` and `strftime_now` helpers. The special tokens are visible as `bos_token`,
`eos_token`, `pad_token` and `unk_token`.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat template does not parse (line {err.lineno}): {err.message}") from err


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **special_tokens: str | None,
) -> str:
    """Render `messages` with the jinja2 chat `template`.

    Args:
      template: jinja2 text, as in a checkpoint's `tokenizer_config.json` or GGUF metadata.
      messages: dicts with at least `role` and `content`.
      add_generation_prompt: passed to the template; templates that support it then end with the
        header of an assistant turn.
      **special_tokens: `bos_token=...`, `eos_token=...` and the like, visible to the template.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{i}] = {message!r} is not a dict with a 'role' key.")
    return _compile(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **special_tokens
    )
