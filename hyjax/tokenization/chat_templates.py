"""Chat templates of the instruct models in our presets, for checkpoints that carry none.

Each is the jinja2 text the model's own `tokenizer_config.json` ships, so prompts match the format the
model was tuned on:

- "chatml": SmolLM2-Instruct (`<|im_start|>role\\n...<|im_end|>`, with SmolLM's default system prompt).
- "zephyr": TinyLlama-1.1B-Chat (`<|user|>\\n...</s>`).
- "llama2": LLaMA-2-Chat (`<s>[INST] <<SYS>>...<</SYS>> ... [/INST]`).
- "llama3": LLaMA-3-Instruct (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`).
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR, "llama2": LLAMA2, "llama3": LLAMA3}


def builtin_chat_template(name: str) -> str:
    """The jinja2 text of built-in chat template `name` ("chatml", "zephyr", "llama2" or "llama3")."""
    try:
        return BUILTIN_CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown chat template {name!r}; built-in templates are {sorted(BUILTIN_CHAT_TEMPLATES)}."
        ) from None


def resolve_chat_template(name_or_template: str) -> str:
    """A built-in template by name, or jinja2 text (anything containing `{{` or `{%`) as given."""
    if "{{" in name_or_template or "{%" in name_or_template:
        return name_or_template
    return builtin_chat_template(name_or_template)
