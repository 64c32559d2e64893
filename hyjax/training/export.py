"""What a finished run exports into `<output_dir>/export`: the adapter in Hugging Face PEFT's format
where PEFT can hold the method, and optionally the merged model as a Hugging Face checkpoint and as a
GGUF file, and a LoRA adapter as a GGUF LoRA file."""

from __future__ import annotations

import pathlib

from hyjax import adapters, hub, pretrained, weights


def export_run(setup, adapted, log) -> dict[str, str]:
    """Writes the exports `config.export` asks for from the final adapted tree (host arrays); returns
    `{kind: folder}`."""
    config = setup.config
    folder = pathlib.Path(config.logging.output_dir) / "export"
    written = {}
    if config.export.peft_adapter:
        base = _base_model_name(config, setup.model_path)
        path = adapters.export_peft(folder / "peft_adapter", setup.model_config, adapted, base_model_name_or_path=base)
        written["peft_adapter"] = str(path)
        log(f"exported the adapter in PEFT's format to {path} (base model {base})")
    if config.export.merged_model:
        path = adapters.export_merged(folder / "merged_model", setup.model_config, adapted, tokenizer=setup.tokenizer)
        written["merged_model"] = str(path)
        log(f"exported the merged model (Hugging Face safetensors) to {path}")
    if config.export.gguf is not None:
        path = weights.save_gguf(folder / f"model-{config.export.gguf}.gguf", setup.model_config,
                                 adapters.merge(adapted), setup.tokenizer, file_type=config.export.gguf,
                                 name=pathlib.Path(config.logging.output_dir).name)
        written["gguf"] = str(path)
        log(f"exported the merged model as GGUF ({config.export.gguf}) to {path}")
    if config.export.gguf_lora:
        path = adapters.export_gguf_lora(folder / "lora_adapter.gguf", setup.model_config, adapted)
        written["gguf_lora"] = str(path)
        log(f"exported the LoRA adapter as a GGUF LoRA file (llama.cpp --lora) to {path}")
    return written


def _base_model_name(config, model_path) -> str:
    """What a PEFT adapter names as its base: the Hub id where the model came from the Hub, else the path."""
    if config.model.pretrained:
        return pretrained.hub_id(config.model.path)
    hub_model = hub.parse_model(config.model.path) if config.model.path is not None else None
    if hub_model is not None and hub_model.filename is None:
        return hub_model.repo_id
    return str(model_path or config.model.preset)
