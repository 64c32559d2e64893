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
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hyjax.adapters.api import merge
from hyjax.adapters.boft import BOFTWeight
from hyjax.adapters.full import FullWeight
from hyjax.adapters.lora import LoRAWeight
from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.selective import SelectiveWeight
from hyjax.adapters.targets import iter_paths
from hyjax.checkpoints.hf import save_hf_checkpoint
from hyjax.checkpoints.names import tensor_names
from hyjax.model.config import LlamaConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_TENSORS = {"LORA": ("lora_A.weight", "lora_B.weight"), "BOFT": ("boft_R", "boft_s")}


def _modules(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """Our path -> (Hugging Face module name template, per layer) for every projection kernel."""
    return {"/".join(n.path): (n.hf.removesuffix(".weight"), n.per_layer)
            for n in tensor_names(config) if n.is_kernel}


def _unsupported(reason: str) -> ValueError:
    return ValueError(f"PEFT cannot represent this adapter tree: {reason}. Write a merged Hugging Face "
                      "checkpoint instead with hyjax.adapters.export_merged(folder, config, adapted_params)")


def _peft_method(config: LlamaConfig, adapted: dict) -> tuple[str, dict[str, AdaptedWeight], dict]:
    """('LORA' | 'BOFT', adapted leaves by path, PEFT hyperparameters), or raises naming what does not fit."""
    modules = _modules(config)
    nodes = {path: leaf for path, leaf in iter_paths(adapted) if isinstance(leaf, AdaptedWeight)}
    if not nodes:
        raise ValueError("the parameter tree holds no adapted weight; there is no adapter to export")
    settings = {}
    for path, node in nodes.items():
        if type(node) in (LoRAWeight, SelectiveWeight):
            method, hyper = "LORA", {"r": int(node.a.shape[-1]), "lora_alpha": node.scale * node.a.shape[-1],
                                     "lora_dropout": node.dropout}
        elif type(node) is BOFTWeight:
            if node.neumann_terms:
                raise _unsupported(f"{path} uses a Neumann-series Cayley transform, PEFT's BOFT only the exact one")
            method, hyper = "BOFT", {"boft_block_size": int(node.r.shape[-1]),
                                     "boft_n_butterfly_factor": int(node.r.shape[-4]),
                                     "boft_dropout": node.dropout}
        elif type(node) is FullWeight:
            if path not in modules:
                raise _unsupported(f"{path} is trained fully (FullWeight); PEFT saves whole modules "
                                   "(modules_to_save) only for projections here")
            continue
        else:
            raise _unsupported(f"{path} is adapted with {type(node).__name__} ({node.NAME!r}); PEFT export "
                               "supports LoRAWeight, SelectiveWeight, BOFTWeight and FullWeight (on projections)")
        if path not in modules:
            raise _unsupported(f"{path} is not a projection PEFT adapts as a Linear layer")
        settings[path] = (method, hyper)
    if not settings:
        raise _unsupported(f"every adapted weight ({sorted(nodes)}) is a FullWeight; a PEFT adapter needs "
                           "LoRA or BOFT on at least one module")
    method, hyper = next(iter(settings.values()))
    if any(other != (method, hyper) for other in settings.values()):
        listing = "; ".join(f"{p}: {m} {h}" for p, (m, h) in settings.items())
        raise _unsupported(f"its adapted weights differ in method or hyperparameters ({listing})")
    return method, nodes, hyper


def _layer_values(method: str, node: AdaptedWeight, num_layers: int | None) -> list:
    """Per layer (one entry for an unstacked weight): the PEFT adapter tensors as a tuple, or the whole
    trained weight `W^T` as one array for a fully trained layer."""
    def kernel_t(w):
        return np.swapaxes(np.asarray(w, np.float32), -1, -2)

    if isinstance(node, FullWeight):
        values = kernel_t(node.base)
        return list(values) if num_layers else [values]
    if method == "LORA":
        adapter = (kernel_t(node.a), kernel_t(node.b))
    else:
        adapter = (np.asarray(node.r, np.float32), np.asarray(node.s, np.float32)[..., None])
    if not num_layers:
        return [adapter]
    layers = [tuple(v[i] for v in adapter) for i in range(num_layers)]
    if isinstance(node, SelectiveWeight):
        for j, i in enumerate(np.asarray(node.chosen).tolist()):
            layers[i] = kernel_t(node.full[j])
    return layers


def export_peft(folder: str | os.PathLike, config: LlamaConfig, adapted_params: dict,
                base_model_name_or_path: str) -> pathlib.Path:
    """Writes the adapters of `adapted_params` as a PEFT adapter folder that
    `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder)` loads.

    The base model must hold the adapted tree's base weights (`save_hf_checkpoint` of them). LoRA's
    scale is written as `lora_alpha = scale * r` with `use_rslora = false` (the same scaling). Fully
    trained projections become `modules_to_save` (see the module docstring).
    Raises, pointing to `export_merged`, for trees PEFT cannot represent.
    """
    method, nodes, hyper = _peft_method(config, adapted_params)
    modules = _modules(config)
    tensors, adapted_modules, saved_modules = {}, [], []
    for path, node in nodes.items():
        template, per_layer = modules[path]
        layers = _layer_values(method, node, config.num_layers if per_layer else None)
        for i, values in enumerate(layers):
            module = template.format(i=i)
            if isinstance(values, tuple):
                adapted_modules.append(module)
                tensors.update({f"{PREFIX}{module}.{name}": np.ascontiguousarray(value)
                                for name, value in zip(_TENSORS[method], values)})
            else:
                saved_modules.append(module)
                tensors[f"{PREFIX}{module}.weight"] = np.ascontiguousarray(values)
    if saved_modules:
        targets = adapted_modules
    else:
        targets = sorted({modules[path][0].rsplit(".", 1)[-1] for path in nodes})
    adapter_config = {"peft_type": method, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                      "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                      **hyper}
    if saved_modules:
        adapter_config["modules_to_save"] = saved_modules
    if method == "LORA":
        adapter_config.update(use_rslora=False, init_lora_weights=True)
    else:
        adapter_config.update(boft_block_num=0, init_weights=True)
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
    if method not in _TENSORS:
        raise ValueError(f"{folder / CONFIG_NAME}: peft_type={method!r} is not supported; import reads LORA and BOFT")
    if method == "LORA":
        for key in ("use_dora", "lora_bias"):
            if peft.get(key):
                raise ValueError(f"{folder / CONFIG_NAME}: {key}=true is not supported by import_peft")
        for key in ("rank_pattern", "alpha_pattern"):
            if peft.get(key):
                raise ValueError(f"{folder / CONFIG_NAME}: per-module {key}={peft[key]} is not supported by "
                                 "import_peft")
    if peft.get("modules_to_save"):
        raise ValueError(f"{folder / CONFIG_NAME}: modules_to_save={peft['modules_to_save']} (fully trained modules) "
                         "is not supported by import_peft; merge the adapter in PEFT and load the merged model")
    with safe_open(str(folder / WEIGHTS_NAME), "np") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    params = base_params
    found = set()
    for path, (template, per_layer) in _modules(config).items():
        layers = range(config.num_layers) if per_layer else [None]
        names = [PREFIX + template.format(i=i) for i in layers]
        present = [n for n in names if f"{n}.{_TENSORS[method][0]}" in stored]
        if not present:
            continue
        pieces = [[_tensor(stored, n, t, found) if n in present else None for n in names] for t in _TENSORS[method]]
        first, second = (_fill(p, identity, per_layer) for p, identity in zip(pieces, _IDENTITY[method]))
        build = _lora_node if method == "LORA" else _boft_node
        params = _set(params, path, build(peft, _get(base_params, path), first, second))
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


# Per method, the identity value of each tensor, for layers an adapter leaves out.
_IDENTITY = {"LORA": (np.zeros_like, np.zeros_like), "BOFT": (np.zeros_like, np.ones_like)}


def _fill(pieces, identity, per_layer):
    """Stacks per-layer arrays, putting `identity(like)` where a layer has none; unstacked weights: the one."""
    if not per_layer:
        return pieces[0]
    template = next(p for p in pieces if p is not None)
    return np.stack([p if p is not None else identity(template) for p in pieces])


def _lora_node(peft, base, lora_a, lora_b) -> LoRAWeight:
    rank = int(peft["r"])
    scale = peft["lora_alpha"] / (np.sqrt(rank) if peft.get("use_rslora") else rank)
    a = np.swapaxes(lora_a, -1, -2)  # [..., d_in, r]
    b = np.swapaxes(lora_b, -1, -2)  # [..., r, d_out]
    if a.shape[-1] != rank:
        raise ValueError(f"PEFT adapter declares r={rank} but lora_A has rank {a.shape[-1]}")
    return LoRAWeight(base=base, a=jnp.asarray(a), b=jnp.asarray(b), scale=float(scale),
                      dropout=float(peft.get("lora_dropout", 0.0)))


def _boft_node(peft, base, boft_r, boft_s) -> BOFTWeight:
    # boft_r: [..., m, d_in / b, b, b]; boft_s: [..., d_out, 1]
    return BOFTWeight(base=base, r=jnp.asarray(boft_r), s=jnp.asarray(boft_s[..., 0]),
                      dropout=float(peft.get("boft_dropout", 0.0)))


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
