"""Adapters in Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), and merged export.

PEFT names a module's adapter tensors after the module inside `PeftModel`, e.g. for `LlamaForCausalLM`
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Our adapters are stacked over
layers and kernels are `[d_in, d_out]`, so per layer:

    LoRA  lora_A.weight = A^T [r, d_in]   lora_B.weight = B^T [d_out, r]   scaling = lora_alpha / r
    BOFT  boft_R = r [m, d_in / b, b, b]  boft_s = s[:, None] [d_out, 1]

PEFT can represent LoRA and exact-Cayley BOFT/OFT on projections, one method per tree with one set of
hyperparameters. Everything else (other methods, hybrids, mixed trees, Neumann BOFT) is exported
merged: `export_merged` writes a plain Hugging Face checkpoint with the adapters folded into the weights.

Fully trained projections (Hybrid-LoRA: `FullWeight`, and the chosen layers of a `SelectiveWeight`)
go to PEFT's `modules_to_save`, named in full (`model.layers.3.self_attn.q_proj`), with their whole
weight stored as PEFT writes it, `base_model.model.model.layers.3.self_attn.q_proj.weight` = W^T
`[d_out, d_in]`. `target_modules` then lists the adapted modules in full too. (PEFT matches a listed
name against a module's name exactly or as a suffix after a dot, so layer 3 never matches layer 13.)

PEFT's BOFT keeps m > 1 butterfly factors only where its CUDA extension `fbd_cuda` builds; without it
PEFT silently uses m = 1 and cannot load an m > 1 adapter. OFT (m = 1) loads everywhere.

Each adapter class converts itself (`AdaptedWeight.PEFT_TYPE`, `peft_settings`, `peft_layers`,
`from_peft`, ...); this module only walks the tree, checks that one PEFT method fits it, and reads and
writes the files.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hyjax.adapters.api import merge
from hyjax.adapters.node import AdaptedWeight, peft_unsupported
from hyjax.adapters.targets import iter_paths
from hyjax.weights.hf import save_hf_checkpoint
from hyjax.weights.names import tensor_names
from hyjax.model.config import LlamaConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _modules(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """Our path -> (Hugging Face module name template, per layer) for every projection kernel."""
    return {"/".join(n.path): (n.hf.removesuffix(".weight"), n.per_layer)
            for n in tensor_names(config) if n.is_kernel}


def _adapter_classes() -> list[type[AdaptedWeight]]:
    """Every subclass of AdaptedWeight defined so far (importing this module imports all of hyjax.adapters')."""
    classes, todo = [], [AdaptedWeight]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in classes:
                classes.append(sub)
                todo.append(sub)
    return classes


def _importers() -> dict[str, type[AdaptedWeight]]:
    """peft_type -> the adapter class that reads it (the one that defines `from_peft`)."""
    importers = {}
    for cls in _adapter_classes():
        if cls.PEFT_TYPE and "from_peft" in vars(cls):
            if importers.setdefault(cls.PEFT_TYPE, cls) is not cls:
                raise TypeError(f"{importers[cls.PEFT_TYPE].__name__} and {cls.__name__} both import peft_type "
                                f"{cls.PEFT_TYPE!r}")
    return importers


def _listing(names, conjunction: str) -> str:
    """The names sorted, as `a, b and c` (or `a, b or c`)."""
    *most, last = sorted(set(names))
    return f"{', '.join(most)} {conjunction} {last}" if most else last


def _peft_method(config: LlamaConfig, adapted: dict) -> tuple[str, dict[str, AdaptedWeight], dict]:
    """(peft_type, adapted leaves by path, the method's adapter_config entries: its hyperparameters and
    fixed settings), or raises naming what does not fit."""
    modules = _modules(config)
    nodes = {path: leaf for path, leaf in iter_paths(adapted) if isinstance(leaf, AdaptedWeight)}
    if not nodes:
        raise ValueError("the parameter tree holds no adapted weight; there is no adapter to export")
    settings = {}
    for path, node in nodes.items():
        if node.PEFT_SAVED_WHOLE:
            if path not in modules:
                raise peft_unsupported(f"{path} is trained fully ({type(node).__name__}); PEFT saves whole modules "
                                       "(modules_to_save) only for projections here")
            continue
        if node.PEFT_TYPE is None:
            supported = [cls.__name__ for cls in _adapter_classes() if cls.PEFT_TYPE or cls.PEFT_SAVED_WHOLE]
            raise peft_unsupported(f"{path} is adapted with {type(node).__name__} ({node.NAME!r}); PEFT export "
                                   f"supports {_listing(supported, 'and')} (on projections)")
        hyper = node.peft_settings(path)
        if path not in modules:
            raise peft_unsupported(f"{path} is not a projection PEFT adapts as a Linear layer")
        settings[path] = (node.PEFT_TYPE, hyper)
    if not settings:
        whole = " or ".join(sorted({type(node).__name__ for node in nodes.values()}))
        methods = _listing([cls.PEFT_TYPE for cls in _adapter_classes() if cls.PEFT_TYPE], "or")
        raise peft_unsupported(f"every adapted weight ({sorted(nodes)}) is a {whole}; a PEFT adapter needs "
                               f"{methods} on at least one module")
    first = next(iter(settings))
    method, hyper = settings[first]
    if any(other != (method, hyper) for other in settings.values()):
        listing = "; ".join(f"{p}: {m} {h}" for p, (m, h) in settings.items())
        raise peft_unsupported(f"its adapted weights differ in method or hyperparameters ({listing})")
    return method, nodes, {**hyper, **nodes[first].PEFT_CONFIG}


def export_peft(folder: str | os.PathLike, config: LlamaConfig, adapted_params: dict,
                base_model_name_or_path: str) -> pathlib.Path:
    """Writes the adapters of `adapted_params` as a PEFT adapter folder that
    `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder)` loads.

    The base model must hold the adapted tree's base weights (`save_hf_checkpoint` of them). LoRA's
    scale is written as `lora_alpha = scale * r` with `use_rslora = false` (the same scaling). Fully
    trained projections become `modules_to_save` (see the module docstring).
    Raises, pointing to `export_merged`, for trees PEFT cannot represent.
    """
    method, nodes, settings = _peft_method(config, adapted_params)
    modules = _modules(config)
    tensors, adapted_modules, saved_modules = {}, [], []
    for path, node in nodes.items():
        template, per_layer = modules[path]
        for i, values in enumerate(node.peft_layers(config.num_layers if per_layer else None)):
            module = template.format(i=i)
            if isinstance(values, dict):  # the layer's adapter tensors
                adapted_modules.append(module)
                tensors.update({f"{PREFIX}{module}.{name}": np.ascontiguousarray(value)
                                for name, value in values.items()})
            else:  # the whole trained weight
                saved_modules.append(module)
                tensors[f"{PREFIX}{module}.weight"] = np.ascontiguousarray(values)
    if saved_modules:
        targets = adapted_modules
    else:
        targets = sorted({modules[path][0].rsplit(".", 1)[-1] for path in nodes})
    adapter_config = {"peft_type": method, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                      "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                      **settings}
    if saved_modules:
        adapter_config["modules_to_save"] = saved_modules
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return folder


def export_merged(folder: str | os.PathLike, config: LlamaConfig, adapted_params: dict, tokenizer=None) -> pathlib.Path:
    """Folds every adapter into its weight (`adapters.merge`) and writes a plain Hugging Face checkpoint.

    Works for every method and hybrid. Returns the folder of the merged checkpoint (a full model that
    `LlamaForCausalLM.from_pretrained` loads, not a PEFT adapter).
    """
    return save_hf_checkpoint(folder, config, merge(adapted_params), tokenizer=tokenizer)


def import_peft(folder: str | os.PathLike, config: LlamaConfig, base_params: dict) -> dict:
    """A PEFT LoRA or BOFT adapter folder read into our adapted tree on `base_params`.

    Layers the adapter leaves out (`layers_to_transform`) get an identity adapter (LoRA A = B = 0;
    BOFT r = 0, s = 1), since our adapters are stacked over all layers.
    """
    folder = pathlib.Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    peft = json.loads((folder / CONFIG_NAME).read_text())
    method = peft.get("peft_type")
    importers = _importers()
    if method not in importers:
        raise ValueError(f"{folder / CONFIG_NAME}: peft_type={method!r} is not supported; import reads "
                         f"{_listing(importers, 'and')}")
    adapter = importers[method]
    adapter.check_peft_config(peft, str(folder / CONFIG_NAME))
    if peft.get("modules_to_save"):
        raise ValueError(f"{folder / CONFIG_NAME}: modules_to_save={peft['modules_to_save']} (fully trained modules) "
                         "is not supported by import_peft; merge the adapter in PEFT and load the merged model")
    with safe_open(str(folder / WEIGHTS_NAME), "np") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    params = base_params
    found = set()
    marker = next(iter(adapter.PEFT_TENSORS))  # a module is adapted where it has this tensor
    for path, (template, per_layer) in _modules(config).items():
        layers = range(config.num_layers) if per_layer else [None]
        names = [PREFIX + template.format(i=i) for i in layers]
        present = [n for n in names if f"{n}.{marker}" in stored]
        if not present:
            continue
        tensors = {t: _fill([_tensor(stored, n, t, found) if n in present else None for n in names], identity,
                            per_layer)
                   for t, identity in adapter.PEFT_TENSORS.items()}
        params = _set(params, path, adapter.from_peft(peft, _get(base_params, path), tensors))
    unused = sorted(set(stored) - found)
    if not found or unused:
        raise ValueError(f"{folder / WEIGHTS_NAME}: tensors that match no projection of this model: "
                         f"{unused[:5] or sorted(stored)[:5]}; is it an adapter for a LLaMA model of this config?")
    return params


def _tensor(stored, module, name, found):
    key = f"{module}.{name}"
    if key not in stored:
        raise ValueError(f"PEFT adapter has {module} but lacks its tensor {key}")
    found.add(key)
    return np.asarray(stored[key], np.float32)


def _fill(pieces, identity: float, per_layer):
    """Stacks per-layer arrays, filling in `identity` where a layer has none; unstacked weights: the one."""
    if not per_layer:
        return pieces[0]
    template = next(p for p in pieces if p is not None)
    return np.stack([p if p is not None else np.full_like(template, identity) for p in pieces])


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> dict:
    """A copy of `tree` (copied along `path` only) with `value` at `path`."""
    head, *rest = path.split("/")
    out = dict(tree)
    out[head] = _set(tree[head], "/".join(rest), value) if rest else value
    return out
