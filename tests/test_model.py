"""The Flax LLaMA against Hugging Face transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hyjax import model as M
from hyjax.weights import load_hf_checkpoint, save_hf_checkpoint

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2)

VARIANTS = {
    "gqa_untied": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_llama3_rope": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "explicit_head_dim": dict(head_dim=24),
}


def _torch_model(variant: str, tmp_path) -> tuple[transformers.LlamaForCausalLM, object]:
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**{**TINY, **VARIANTS[variant]})
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms away from 1 so they are tested too
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "hf")
    return hf_model, tmp_path / "hf"


def _torch_logits(hf_model, tokens, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return hf_model(torch.tensor(tokens), attention_mask=mask).logits.float().numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf_model, folder = _torch_model(variant, tmp_path)
    config, params = load_hf_checkpoint(folder)
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, 37))
    ours = np.asarray(jax.jit(lambda p, t: M.apply(config, p, t))(params, jnp.asarray(tokens)))
    ref = _torch_logits(hf_model, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not of near-zero numbers
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_padding_and_packing_masks_match_transformers(tmp_path):
    """Right padding (segment 0) gives transformers' logits on the real tokens; two sequences packed
    in one row (segments 1, 2 with restarted positions) give each sequence's own logits."""
    hf_model, folder = _torch_model("gqa_untied", tmp_path)
    config, params = load_hf_checkpoint(folder)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 160, size=11), rng.integers(0, 160, size=7)
    row = np.concatenate([a, b, np.zeros(6, int)])[None]
    segments = np.array([[1] * 11 + [2] * 7 + [0] * 6])
    positions = np.array([list(range(11)) + list(range(7)) + [0] * 6])
    ours = np.asarray(M.apply(config, params, jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(ours[0, :11], _torch_logits(hf_model, a[None])[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[0, 11:18], _torch_logits(hf_model, b[None])[0], atol=2e-5, rtol=1e-5)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """Freshly initialised hyjax weights, written as a Hugging Face folder, give the same logits there."""
    config = M.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                           num_kv_heads=2, rope_scaling=M.RopeScaling(original_max_position_embeddings=32),
                           rope_theta=50000.0, bos_token_id=1, eos_token_id=(2, 3))
    params = M.init_params(config, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params)  # logits of order one
    save_hf_checkpoint(tmp_path / "out", config, params)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(4).integers(0, 128, size=(3, 20))
    ours = np.asarray(M.apply(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)
    assert list(hf_model.generation_config.eos_token_id) == [2, 3]


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(policy):
    config = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                           num_kv_heads=2)
    params = M.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)

    def loss(p, cfg):
        logits = M.apply(cfg, p, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    reference = jax.grad(loss)(params, config)
    rematted = jax.jit(jax.grad(loss), static_argnums=1)(params, config.replace(remat=policy))
    for ref, got in zip(jax.tree.leaves(reference), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    hf_model, folder = _torch_model("gqa_untied", tmp_path)
    config, params = load_hf_checkpoint(folder)
    config16, params16 = load_hf_checkpoint(folder, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    tokens = jnp.arange(30)[None] % 160
    full = np.asarray(M.apply(config, params, tokens))
    half = np.asarray(M.apply(config16, params16, tokens))
    assert half.dtype == np.float32
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()
    assert (half.argmax(-1) == full.argmax(-1)).mean() > 0.9


PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
    "tinyllama-1.1b": 1_100_048_384, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_build_abstractly_with_published_size(name):
    config = M.preset(name)
    abstract = M.abstract_params(config)
    count = M.count_params(abstract)
    assert abs(count - PUBLISHED_PARAMS[name]) <= 1e-3 * PUBLISHED_PARAMS[name]
    assert count == config.num_params()
    axes = M.logical_axes(config)
    for shape, names in zip(jax.tree.leaves(abstract), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(names) == len(shape.shape)
    assert axes["layers"]["attn"]["q_proj"] == ("layers", "embed", "heads")


def test_unknown_preset_names_close_matches():
    with pytest.raises(KeyError, match="llama3.1-8b"):
        M.preset("llama-3.1-8b")
