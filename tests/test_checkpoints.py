"""Checkpoint I/O: GGUF (every quant type we promise) and Hugging Face folders, and their errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from gguf_writer import RawTensor, write_llama_gguf

from hyjax import model as M
from hyjax.weights import CheckpointError, load_checkpoint, load_gguf, load_hf_checkpoint, save_hf_checkpoint
from hyjax.weights.names import export_tensors
from hyjax.model.config import UnsupportedConfigError

# Hidden sizes of 256 so K-quant super-blocks (256 values) fit every row.
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1)


def _torch_model(**changes):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**{**TINY, **changes})
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, hf_config.to_dict(), state


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_float_model_matches_transformers(tmp_path, tied):
    """A GGUF written with llama.cpp's conventions (Q/K rows permuted) runs like the original model."""
    model, hf_config, state = _torch_model(tie_word_embeddings=tied)
    write_llama_gguf(tmp_path / "m.gguf", state, hf_config)
    config, params = load_gguf(tmp_path / "m.gguf")
    assert config.tie_embeddings == tied and config.num_kv_heads == 2
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    ours = np.asarray(M.apply(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _logits(model, tokens), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K,
                                   QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q5_K])
def test_gguf_quant_types_dequantize_to_what_the_file_holds(tmp_path, qtype):
    _, hf_config, state = _torch_model()
    held = write_llama_gguf(tmp_path / "m.gguf", state, hf_config, default_type=qtype)
    config, params = load_gguf(tmp_path / "m.gguf")
    ours = export_tensors(config, params, "hf")
    assert set(ours) == set(held)
    for name, array in held.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    if qtype in (QT.F32, QT.F16, QT.BF16, QT.Q8_0):  # types that round the real weights, not random blocks
        q = ours["model.layers.1.self_attn.q_proj.weight"]
        np.testing.assert_allclose(q, state["model.layers.1.self_attn.q_proj.weight"], atol=0.02)


def test_gguf_llama31_rope_factors_become_llama3_scaling(tmp_path):
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    model, hf_config, state = _torch_model(rope_theta=500000.0, rope_scaling=rope, max_position_embeddings=16384)
    write_llama_gguf(tmp_path / "m.gguf", state, hf_config)
    config, params = load_gguf(tmp_path / "m.gguf")
    assert config.rope_scaling == M.RopeScaling()
    tokens = np.arange(40)[None] % 256
    np.testing.assert_allclose(np.asarray(M.apply(config, params, jnp.asarray(tokens))), _logits(model, tokens),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("type_id, size, message", [
    (int(QT.TQ1_0), 256 * 54, r"blk\.0\.attn_q\.weight .* type TQ1_0.*supported"),  # gguf knows it, we do not
    (99, 256 * 256, r"cannot read GGUF file.*99\) is not a valid"),                  # nobody knows it
])
def test_gguf_unknown_quant_types_are_refused(tmp_path, type_id, size, message):
    _, hf_config, state = _torch_model()
    raw = RawTensor(type_id=type_id, shape=(256, 256), data=bytes(size))
    write_llama_gguf(tmp_path / "m.gguf", state, hf_config,
                     raw_tensors={"model.layers.0.self_attn.q_proj.weight": raw})
    with pytest.raises(CheckpointError, match=message):
        load_gguf(tmp_path / "m.gguf")


def test_gguf_unsupported_metadata_is_refused(tmp_path):
    _, hf_config, state = _torch_model()
    write_llama_gguf(tmp_path / "m.gguf", state, hf_config, metadata_overrides={"llama.expert_count": 8})
    with pytest.raises(UnsupportedConfigError, match="llama.expert_count"):
        load_gguf(tmp_path / "m.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------ Hugging Face


def test_sharded_folder_round_trips(tmp_path):
    model, _, _ = _torch_model()
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf_checkpoint(tmp_path / "hf")
    save_hf_checkpoint(tmp_path / "ours", config, params, max_shard_bytes=600_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config2, params2 = load_hf_checkpoint(tmp_path / "ours")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = np.arange(30)[None]
    np.testing.assert_allclose(_logits(reloaded, tokens), _logits(model, tokens), atol=1e-6)


def _saved_folder(tmp_path):
    model, _, _ = _torch_model()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "empty").mkdir()
        load_hf_checkpoint(tmp_path / "empty")


def test_truncated_safetensors_is_reported(tmp_path):
    folder = _saved_folder(tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_hf_checkpoint(folder)


def test_missing_shard_and_missing_tensor_are_reported(tmp_path):
    folder = _saved_folder(tmp_path)
    config, params = load_hf_checkpoint(folder)
    save_hf_checkpoint(tmp_path / "sharded", config, params, max_shard_bytes=600_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    second_shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / second_shard).unlink()
    with pytest.raises(CheckpointError, match=f"{second_shard} is missing"):
        load_hf_checkpoint(tmp_path / "sharded")
    del index["weight_map"]["model.norm.weight"]
    shutil.copy(folder / "model.safetensors", tmp_path / "sharded" / second_shard)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight is missing"):
        load_hf_checkpoint(tmp_path / "sharded")


def test_pytorch_bin_folder_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(transformers.LlamaConfig(**TINY).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="convert them to safetensors"):
        load_hf_checkpoint(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = _saved_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 384
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape \(512, 256\).*\(384, 256\)"):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type='yarn' is not supported"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling and rope_parameters disagree"),
    ("attention_bias", True, "attention_bias=True is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("sliding_window", 4096, "sliding_window=4096 is not supported"),
    ("num_experts", 8, r"\['num_experts'\] are not supported"),
])
def test_unsupported_config_fields_are_refused(tmp_path, field, value, message):
    folder = _saved_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match=message):
        load_hf_checkpoint(folder)


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "file").write_text("")
    config = M.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                           num_kv_heads=1)
    with pytest.raises(CheckpointError, match="cannot create output folder"):
        save_hf_checkpoint(tmp_path / "file" / "out", config, M.init_params(config, jax.random.key(0)))


# ------------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_real_gguf_to_hf_folder_round_trip(smollm2_gguf, tmp_path):
    """GGUF -> our HF folder -> load again gives identical arrays; transformers loads that folder (with
    the tokenizer we wrote) and gives our logits."""
    from hyjax.tokenization import load_tokenizer

    config, params = load_gguf(smollm2_gguf)
    tokenizer = load_tokenizer(smollm2_gguf)
    save_hf_checkpoint(tmp_path / "smollm2", config, params, tokenizer=tokenizer)
    config2, params2 = load_hf_checkpoint(tmp_path / "smollm2")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    text = "Round trips should not change a single weight of the model."
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    ours = np.asarray(M.apply(config, params, jnp.asarray([ids])))
    np.testing.assert_allclose(ours, _logits(hf_model, [ids]), atol=5e-4, rtol=1e-4)
