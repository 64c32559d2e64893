"""Generic instruction data: prompt/completion columns, or chat `messages` lists ending with the assistant turn."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hyjax.data.examples import Example, PromptStyle, encode_messages, encode_prompt, text_field
from hyjax.data.report import MalformedRow

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Instructions:
    """Rows with `messages` (list of {role, content}) or with prompt/completion text.

    With `messages`, the prompt is the chat-templated conversation up to the last message, which must
    be the assistant's: only that final turn is trained on. With prompt/completion, chat mode puts the
    prompt in a user turn; plain mode writes `template` (`{prompt}`) followed by the completion.

    Attributes:
      messages_column: column of chat lists; used when present (and `mode` allows).
      prompt_column, completion_column: the two text columns otherwise.
      mode: "auto" (messages if that column exists), "messages" or "prompt_completion".
      template: plain-mode prompt with `{prompt}`.
      prompt: chat template use and system message (prompt/completion mode).
    """

    messages_column: str = "messages"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    mode: str = "auto"
    template: str = "{prompt}"
    prompt: PromptStyle = PromptStyle()

    def resolve(self, columns: Sequence[str], source: Any = None) -> Instructions:
        where = f" in {source}" if source is not None else ""
        if self.mode not in ("auto", "messages", "prompt_completion"):
            raise ValueError(f"mode must be 'auto', 'messages' or 'prompt_completion', got {self.mode!r}.")
        if self.mode in ("auto", "messages") and self.messages_column in columns:
            return dataclasses.replace(self, mode="messages")
        pair = (self.prompt_column, self.completion_column)
        if self.mode != "messages" and all(c in columns for c in pair):
            return dataclasses.replace(self, mode="prompt_completion")
        wanted = [self.messages_column] if self.mode == "messages" else [self.messages_column, "or", *pair]
        raise ValueError(f"instruction data needs columns {wanted}{where}; columns present: {list(columns)}.")

    def example(self, row: Mapping[str, Any], tokenizer) -> Example:
        if self.mode == "messages":
            messages = _messages(row.get(self.messages_column), self.messages_column)
            if tokenizer.chat_template is None:
                raise ValueError("chat `messages` data needs a tokenizer with a chat template.")
            return encode_messages(tokenizer, messages[:-1], messages[-1]["content"])
        if self.mode != "prompt_completion":
            raise ValueError("call resolve(columns) first to pick the mode.")
        prompt = text_field(row, self.prompt_column)
        completion = text_field(row, self.completion_column)
        return encode_prompt(tokenizer, self.prompt, prompt, self.template.format(prompt=prompt), completion)


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    """The validated message list, or `MalformedRow`."""
    if value is None:
        raise MalformedRow(f"missing {column!r}")
    if not isinstance(value, (list, tuple)) or not value:
        raise MalformedRow(f"{column!r} is not a non-empty list of messages")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise MalformedRow(f"{column}[{k}] is {type(message).__name__}, not a dict with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise MalformedRow(f"{column}[{k}] has role {role!r} (expected one of {list(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise MalformedRow(f"{column}[{k}] has no text content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise MalformedRow(f"{column} must end with an assistant message, ends with {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise MalformedRow(f"{column} has no prompt before the assistant message")
    return messages
