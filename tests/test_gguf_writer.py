"""Tests for tests/gguf_writer.py: transformers reads our files as llama.cpp's, types round-trip."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from gguf_writer import (  # noqa: E402
    QUANTIZABLE_TYPES,
    RANDOM_BLOCK_TYPES,
    RawTensor,
    gguf_tensor_name,
    llama3_rope_factors,
    permute_qk,
    unpermute_qk,
    write_llama_gguf,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
# Rows of 256 so K-quants (block 256) fit every 2-D tensor.
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms are ones at init; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _load_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def test_names_follow_llama_cpp():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    # gguf-py's own table agrees for every parameter of a real LlamaForCausalLM.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, TINY["num_hidden_layers"])
    for hf_name in _model().state_dict():
        stem, suffix = hf_name.rsplit(".", 1)
        assert gguf_tensor_name(hf_name) == f"{name_map.get_name(stem)}.{suffix}"
    with pytest.raises(ValueError, match="model.layers.0.self_attn.qkv_proj.weight"):
        gguf_tensor_name("model.layers.0.self_attn.qkv_proj.weight")


def test_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    reverse = LlamaTensorProcessor()._reverse_permute_weights
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
        np.testing.assert_array_equal(reverse(permute_qk(w, heads), heads, heads), w)
    # Per head, HF rows i and i + d/2 (the rotate-half pair) become adjacent rows 2i, 2i+1.
    rows = np.arange(16, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(permute_qk(rows, 2)[:8, 0], [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("tied", [False, True])
def test_f32_file_loads_in_transformers_with_same_logits(tmp_path, tied):
    model = _model(tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    held = write_llama_gguf(path, _state_dict(model), model.config.to_dict())
    reader = gguf.GGUFReader(path)
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tied
    for name, array in _state_dict(model).items():
        if not (tied and name == "lm_head.weight"):
            np.testing.assert_array_equal(held[name], array)

    loaded = _load_hf(path)
    assert loaded.config.tie_word_embeddings is tied
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_metadata_matches_converter(tmp_path):
    model = _model(rms_norm_eps=1e-5, max_position_embeddings=512, rope_theta=50000.0)
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, _state_dict(model), model.config.to_dict(), default_type=QT.Q8_0,
                     tokenizer_fields={"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 1,
                                       "tokenizer.ggml.tokens": [f"t{i}" for i in range(256)],
                                       "tokenizer.ggml.token_type": [1] * 256})
    fields = gguf.GGUFReader(path).fields
    got = {k: fields[k].contents() for k in fields if not k.startswith("GGUF.")}
    expected = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 512,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 50000.0, "llama.vocab_size": 256,
        "llama.rope.dimension_count": 16, "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0,
        "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 1,
    }
    for key, value in expected.items():
        assert got[key] == value, key
    assert got["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert got["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]


@pytest.mark.parametrize("qtype", QUANTIZABLE_TYPES + RANDOM_BLOCK_TYPES, ids=lambda t: t.name)
def test_each_type_round_trips_through_gguf_reader(tmp_path, qtype):
    model = _model(**WIDE)
    sd = _state_dict(model)
    path = tmp_path / f"{qtype.name}.gguf"
    held = write_llama_gguf(path, sd, model.config.to_dict(), default_type=qtype)
    n_head, n_kv = WIDE["num_attention_heads"], WIDE["num_key_value_heads"]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == len(held)
    for hf_name, original in sd.items():
        t = tensors[gguf_tensor_name(hf_name)]
        assert t.tensor_type == (qtype if original.ndim == 2 else QT.F32), hf_name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
        heads = n_head if ".q_proj." in hf_name else n_kv if ".k_proj." in hf_name else None
        if heads:
            values = unpermute_qk(values, heads)
        np.testing.assert_array_equal(values, held[hf_name], err_msg=hf_name)
        assert np.all(np.isfinite(values))
        if qtype in QUANTIZABLE_TYPES:  # real weights, rounded: within a few quantization steps
            np.testing.assert_allclose(values, original, atol=0.25 * np.abs(original).max() + 1e-7)
        else:  # random blocks with small scales
            assert 0 < np.abs(values).max() < 8, hf_name


def test_mixed_types_load_in_transformers_as_returned(tmp_path):
    model = _model(**WIDE)
    sd = _state_dict(model)
    types = {"model.embed_tokens.weight": QT.Q6_K, "model.layers.0.self_attn.q_proj.weight": QT.Q4_K,
             "model.layers.0.self_attn.k_proj.weight": QT.Q5_K, "model.layers.0.self_attn.v_proj.weight": QT.Q4_1,
             "model.layers.0.mlp.down_proj.weight": QT.Q8_0, "lm_head.weight": QT.F16}
    path = tmp_path / "mixed.gguf"
    held = write_llama_gguf(path, sd, model.config.to_dict(), tensor_types=types, default_type=QT.Q4_0)
    loaded = _load_hf(path).state_dict()
    for name, array in held.items():
        np.testing.assert_allclose(loaded[name].float().numpy(), array, rtol=0, atol=1e-7, err_msg=name)


def test_llama3_rope_factors_match_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    config = transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 4096, "rope_parameters": rope})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = llama3_rope_factors(config.to_dict())
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0

    path = tmp_path / "l3.gguf"
    held = write_llama_gguf(path, _state_dict(_model()), config.to_dict())
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    assert t.tensor_type == QT.F32
    np.testing.assert_array_equal(t.data, held["rope_freqs.weight"])
    assert llama3_rope_factors(TINY) is None


def test_raw_tensor_with_unknown_type(tmp_path):
    model = _model()
    sd = _state_dict(model)
    name = "model.layers.1.mlp.up_proj.weight"
    path = tmp_path / "raw.gguf"
    held = write_llama_gguf(path, sd, model.config.to_dict(),
                            raw_tensors={name: RawTensor(type_id=99, shape=(128, 64), data=bytes(range(256)) * 4)})
    assert name not in held
    with pytest.raises(ValueError, match="99"):
        gguf.GGUFReader(path)

    # The same path with a known type id yields a file gguf-py reads back byte for byte.
    q8 = gguf.quants.quantize(sd[name], QT.Q8_0)
    path2 = tmp_path / "raw_known.gguf"
    write_llama_gguf(path2, sd, model.config.to_dict(),
                     raw_tensors={name: RawTensor(type_id=int(QT.Q8_0), shape=(128, 64), data=q8.tobytes())})
    t = {t.name: t for t in gguf.GGUFReader(path2).tensors}[gguf_tensor_name(name)]
    assert t.tensor_type == QT.Q8_0 and list(t.shape) == [64, 128]
    np.testing.assert_array_equal(t.data, q8)


def test_metadata_override_and_removal(tmp_path):
    model = _model()
    path = tmp_path / "o.gguf"
    write_llama_gguf(path, _state_dict(model), model.config.to_dict(),
                     metadata_overrides={"llama.attention.head_count": None, "general.architecture": "gpt2"})
    fields = gguf.GGUFReader(path).fields
    assert "llama.attention.head_count" not in fields
    assert fields["general.architecture"].contents() == "gpt2"


def test_bad_requests_name_the_tensor(tmp_path):
    model = _model()
    sd = _state_dict(model)
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*row length 64.*Q4_K block size 256"):
        write_llama_gguf(tmp_path / "x.gguf", sd, model.config.to_dict(),
                         tensor_types={"model.embed_tokens.weight": QT.Q4_K})
    with pytest.raises(ValueError, match="cannot write type IQ2_XXS"):
        write_llama_gguf(tmp_path / "y.gguf", sd, model.config.to_dict(), default_type=QT.IQ2_XXS)
    with pytest.raises(ValueError, match="not in hf_state_dict"):
        write_llama_gguf(tmp_path / "z.gguf", sd, model.config.to_dict(), tensor_types={"nope.weight": QT.F16})
