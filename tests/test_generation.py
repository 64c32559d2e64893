"""KV-cache generation against the uncached model and transformers; the CLI on the real model."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hyjax import model as M
from hyjax.weights import load_gguf, load_hf_checkpoint
from hyjax.sampling import SamplingConfig, generate, generate_with_log_probs, left_pad, sample_token, sampling_log_probs

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    folder = tmp_path_factory.mktemp("tiny")
    hf_model.save_pretrained(folder)
    config, params = load_hf_checkpoint(folder)
    return hf_model, config, params


def test_cached_decoding_equals_the_full_forward_pass(tiny):
    """Prefill with left padding, then token-by-token decoding, reproduces the uncached logits."""
    _, config, params = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    tokens, valid = left_pad(prompts, pad_id=0, multiple=8)
    cache = M.KVCache.empty(config, batch=2, slots=16)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    logits, cache = M.decode(config, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), cache)
    continuation = [[30, 31, 32], [40, 41, 42]]
    stepwise = [logits[:, -1]]
    for step in range(3):
        token = jnp.asarray([[c[step]] for c in continuation])
        pos = jnp.asarray(positions[:, -1:] + 1 + step)
        logits, cache = M.decode(config, params, token, pos, jnp.ones((2, 1), bool), cache)
        stepwise.append(logits[:, -1])
    for row, (prompt, cont) in enumerate(zip(prompts, continuation)):
        full = M.apply(config, params, jnp.asarray([prompt + cont]))[0]
        expected = full[len(prompt) - 1:]
        got = jnp.stack([s[row] for s in stepwise])
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    assert int(cache.index) == 11


def test_greedy_generation_matches_transformers(tiny):
    hf_model, config, params = tiny
    prompt = [1, 17, 33, 49, 65, 81]
    ours = generate(config, params, [prompt], stop_ids=[2], sampling=SamplingConfig(max_new_tokens=24))[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                pad_token_id=2)[0, len(prompt):].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2)]
    assert len(ours) >= 8 and ours == ref


def test_batched_prompts_generate_as_if_alone(tiny):
    _, config, params = tiny
    prompts = [[1, 3, 5, 7, 9, 11, 13, 15, 17, 19], [1, 4]]
    sampling = SamplingConfig(max_new_tokens=12)
    together = generate(config, params, prompts, [2], sampling)
    alone = [generate(config, params, [p], [2], sampling)[0] for p in prompts]
    assert together == alone


def test_each_row_samples_from_its_own_key_whatever_its_batch(tiny):
    """What makes RL's completions independent of how prompts are batched or split over processes."""
    _, config, params = tiny
    prompts = [[1, 3, 5, 7, 9, 11, 13, 15, 17, 19], [1, 4], [1, 50, 60]]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(7), jnp.asarray([11, 12, 13]))
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.95)
    together = generate_with_log_probs(config, params, prompts, [2], keys, sampling)
    alone = [generate_with_log_probs(config, params, [p], [2], keys[i:i + 1], sampling) for i, p in enumerate(prompts)]
    assert together[0] == [tokens[0] for tokens, _ in alone]
    np.testing.assert_allclose(np.concatenate(together[1]), np.concatenate([lp[0] for _, lp in alone]), atol=1e-5)
    other_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(8), jnp.asarray([11, 12, 13]))
    assert generate_with_log_probs(config, params, prompts, [2], other_keys, sampling)[0] != together[0]


def test_copies_of_a_prompt_share_its_prefill_and_sample_as_repeated_rows(tiny):
    """RL's groups: each prompt prefilled once for its copies samples what the prompt repeated does."""
    _, config, params = tiny
    prompts = [[1, 3, 5, 7, 9, 11, 13], [1, 4]]
    keys = jax.random.split(jax.random.key(5), 6)
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    shared = generate_with_log_probs(config, params, prompts, [2], keys, sampling, copies=3)
    repeated = generate_with_log_probs(config, params, [p for p in prompts for _ in range(3)], [2], keys, sampling)
    assert shared[0] == repeated[0] and len(set(map(tuple, shared[0]))) > 2
    # The same tokens from batches of 2 and of 6 rows: float32 log-probabilities (up to -6.5) agree to about 1e-5
    np.testing.assert_allclose(np.concatenate(shared[1]), np.concatenate(repeated[1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="6 keys for 2 prompts x 2 copies"):
        generate_with_log_probs(config, params, prompts, [2], keys, sampling, copies=2)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_the_samplers_log_probs_are_the_training_forwards(tiny, temperature):
    """Each generated token's log-probability under softmax(logits / temperature), from the KV-cache
    sampler, equals the full forward pass over prompt + completion (as a learner computes it), f32."""
    _, config, params = tiny
    prompts = [[1, 3, 5, 7, 9, 11], [1, 4], [1, 80, 81, 82, 83]]
    keys = jax.random.split(jax.random.key(3), len(prompts))
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=0.9)
    completions, log_probs = generate_with_log_probs(config, params, prompts, [2], keys, sampling)
    assert sum(map(len, completions)) > 10
    for prompt, completion, sampled in zip(prompts, completions, log_probs):
        logits = M.apply(config, params, jnp.asarray([prompt + completion]))[0, len(prompt) - 1:-1]
        learned = sampling_log_probs(logits, jnp.asarray(completion), temperature)
        np.testing.assert_allclose(sampled, learned, atol=1e-5)


def test_sampling_follows_the_softmax_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda k, t, p: sample_token(logits, k[None], t, p)[0], in_axes=(0, None, None)))
    freq = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # top_p = 0.7 keeps the tokens whose preceding mass is below 0.7: the first two, renormalised.
    freq = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    # temperature 0.5 squares the probabilities before renormalising.
    freq = np.bincount(np.asarray(draw(keys, 0.5, 1.0)), minlength=4) / len(keys)
    squared = np.array([0.25, 0.09, 0.0225, 0.0025])
    np.testing.assert_allclose(freq, squared / squared.sum(), atol=0.015)
    assert set(np.asarray(draw(keys[:100], 0.0, 1.0)).tolist()) == {0}


def test_generation_arguments_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []], pad_id=0)


# ------------------------------------------------------------------------------------ the real model

PARAGRAPH = (
    "The Eiffel Tower was completed in 1889 as the entrance arch of the World's Fair in Paris. At first many "
    "artists criticised its design, but it soon became a global icon of France and one of the most visited "
    "monuments in the world. It is about 330 metres tall and was the tallest man-made structure until 1930."
)


@pytest.fixture(scope="module")
def real(smollm2_gguf):
    """Our SmolLM2 and transformers' own GGUF loading of the same file (both dequantize with `gguf`)."""
    from hyjax.tokenization import load_tokenizer

    config, params = load_gguf(smollm2_gguf)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    return config, params, load_tokenizer(smollm2_gguf), hf_model


@pytest.mark.slow
def test_real_model_logits_match_transformers(real):
    config, params, tokenizer, hf_model = real
    ids = tokenizer.encode(PARAGRAPH)
    ours = np.asarray(jax.jit(lambda p, t: M.apply(config, p, t))(params, jnp.asarray([ids])))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    max_diff = float(np.abs(ours - ref).max())
    agreement = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"\nSmolLM2-135M over {len(ids)} tokens: max |logit diff| = {max_diff:.2e}, "
          f"argmax agreement = {agreement:.3f}")
    assert len(ids) > 60
    assert max_diff < 1e-3 and agreement == 1.0


@pytest.mark.slow
def test_real_model_greedy_matches_transformers_for_32_tokens(real):
    config, params, tokenizer, hf_model = real
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}]), add_bos=False)
    ours = generate(config, params, [prompt], sorted(tokenizer.stop_ids), SamplingConfig(max_new_tokens=32))[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
    assert len(ours) == 32
    assert ours == ref.tolist()


def test_cli_answers_paris(smollm2_gguf):
    env = {**os.environ, "HYJAX_SMOLLM2_GGUF": str(smollm2_gguf), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "hyjax.generate", "--prompt", "What is the capital of France?",
                             "--max-new-tokens", "24"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_rejects_bad_arguments_before_loading(tmp_path):
    env = {**os.environ, "HYJAX_SMOLLM2_GGUF": str(tmp_path / "absent.gguf"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "hyjax.generate", "--prompt", "x", "--top-p", "1.5"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "top_p=1.5 must be in (0, 1]" in result.stderr
    result = subprocess.run([sys.executable, "-m", "hyjax.generate", "--prompt", "x", "--model",
                             str(tmp_path / "missing.gguf")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "missing.gguf' does not exist" in result.stderr
