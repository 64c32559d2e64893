"""GGUF export: the merged model (F32/F16/BF16/Q8_0) with its tokenizer, read back by our reader and by
transformers' GGUF loader, and a LoRA adapter as llama.cpp's GGUF LoRA file."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
import sentencepiece
import tokenizers
from conftest import sentiment_rows

from hyjax import adapters as A
from hyjax import model as M
from hyjax.config import ConfigError, load_config
from hyjax.tokenization import PRE_TOKENIZERS, HFTokenizer, load_tokenizer
from hyjax.tokenization.gguf_vocab import GGUFTokenizerError
from hyjax.weights import load_checkpoint, load_gguf, save_gguf
from hyjax.weights.gguf_reader import read_gguf, read_gguf_metadata
from hyjax.weights.names import export_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
TEXTS = ["Review: a gripping, warm film 12345\nSentiment:", "<|im_start|>user\nçà 🙂 naïve<|im_end|>", "  spaces\t"]
SMALL = M.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      rope_theta=500000.0, max_position_embeddings=256, bos_token_id=None, eos_token_id=2)
TOKENS = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 12))
_apply = jax.jit(M.apply, static_argnums=0)


def _scaled(params):
    """Weights of order-one logits, and norms that are not all ones."""
    return jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x + 0.1 * np.cos(np.arange(x.size)), params)


@pytest.fixture(scope="module")
def small():
    """A small untied LLaMA and a byte-level BPE tokenizer (SmolLM's split) trained on a few lines: 300 tokens
    for 320 embedding rows, so the file lists padding tokens as llama.cpp's converter does."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = PRE_TOKENIZERS["smollm"].build()
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    backend.train_from_iterator(TEXTS * 20 + ["the story is dull and tedious"] * 20, trainer)
    tokenizer = HFTokenizer(backend, bos_id=None, eos_id=2, pad_id=None, unk_id=None, add_bos=False,
                            chat_template=None)
    return SMALL, _scaled(M.init_params(SMALL, jax.random.key(0))), tokenizer


def _transformers_logits(path, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_a_real_tokenizer_and_f32_weights_read_back_exactly(tiny_checkpoint, tmp_path):
    config, params = load_checkpoint(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)  # SmolLM2-135M-Instruct's tokenizer.json
    path = save_gguf(tmp_path / "model.gguf", config, params, tokenizer, file_type="f32", name="my-run")
    assert {t.name for t in read_gguf(path).tensors} == set(export_tensors(config, params, "gguf"))
    found_config, found = load_gguf(path)
    assert found_config == config.replace(rms_norm_eps=float(np.float32(config.rms_norm_eps)))  # GGUF stores f32
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(found)):
        np.testing.assert_array_equal(ours, theirs)
    read_back = load_tokenizer(path)
    assert [read_back.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
    assert read_back.decode(tokenizer.encode(TEXTS[1]), skip_special_tokens=False) == TEXTS[1]
    assert ((read_back.bos_id, read_back.eos_id, read_back.pad_id, read_back.unk_id, read_back.add_bos_default,
             read_back.chat_template) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id,
                                          tokenizer.add_bos_default, tokenizer.chat_template))
    metadata = read_gguf_metadata(path)
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "smollm"
    assert metadata["general.type"] == "model" and metadata["general.name"] == "my-run"
    assert metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert not list(tmp_path.glob(".*.tmp"))


# Largest weight error per tensor, as a share of the tensor's largest magnitude: f16 and bf16 round to
# 11 and 8 significant bits; Q8_0 rounds each block of 32 to steps of d = max|block| / 127 (error d / 2)
# and stores d in f16 (error up to 127 d 2^-11 more): d (0.5 + 0.062) < max / 220.
ROUNDING = {"f16": 2 ** -11, "bf16": 2 ** -8, "q8_0": 1 / 220}


@pytest.mark.parametrize("file_type, matrix_type", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)])
def test_each_file_type_loads_in_transformers_with_our_logits(small, tmp_path, file_type, matrix_type):
    config, params, tokenizer = small
    path = save_gguf(tmp_path / f"model-{file_type}.gguf", config, params, tokenizer, file_type=file_type)
    types = {t.name: Q(t.tensor_type) for t in read_gguf(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == matrix_type
    assert types["blk.1.ffn_norm.weight"] == types["output_norm.weight"] == Q.F32
    found_config, found = load_gguf(path)
    assert found_config == config.replace(rms_norm_eps=float(np.float32(config.rms_norm_eps)))
    # The file holds the exported weights up to the type's rounding ...
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(found)):
        assert np.abs(np.asarray(theirs) - ours).max() <= ROUNDING[file_type] * np.abs(ours).max()
    # ... and an independent reader of the file computes the model we read from it (names, q/k row order).
    np.testing.assert_allclose(_transformers_logits(path, TOKENS), _apply(found_config, found, TOKENS),
                               atol=2e-4, rtol=1e-4)


def test_transformers_reads_the_tokenizer_and_its_padding_tokens(small, tmp_path):
    config, params, tokenizer = small
    path = save_gguf(tmp_path / "model.gguf", config, params, tokenizer, file_type="f16")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text, add_bos=False)
    metadata = read_gguf_metadata(path)
    assert len(metadata["tokenizer.ggml.tokens"]) == config.vocab_size
    assert metadata["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert metadata["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert load_tokenizer(path).encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


def test_a_sentencepiece_tokenizer_is_written_as_llama_cpp_s_llama_vocabulary(tmp_path):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([text for text, _ in sentiment_rows(400, 0)]), model_prefix=str(tmp_path / "m"),
        vocab_size=340, model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True)
    tokenizer = load_tokenizer(tmp_path / "m.model")
    config = SMALL.replace(num_layers=1, vocab_size=384, bos_token_id=1)
    path = save_gguf(tmp_path / "model.gguf", config, M.init_params(config, jax.random.key(0)), tokenizer)
    metadata = read_gguf_metadata(path)
    assert metadata["tokenizer.ggml.model"] == "llama"
    assert metadata["tokenizer.ggml.token_type"][3] == gguf.TokenType.BYTE  # byte fallback pieces
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the film is warm and gripping", "Hello wörld 123", "two  spaces"]:
        assert theirs.encode(text) == tokenizer.encode(text)


def test_llama3_rope_scaling_is_written_as_llama_cpp_factors(small, tmp_path):
    config, params, tokenizer = small
    scaled = config.replace(rope_scaling=M.RopeScaling())
    path = save_gguf(tmp_path / "model.gguf", scaled, params, tokenizer, file_type="f32")
    assert "rope_freqs.weight" in {t.name for t in read_gguf(path).tensors}
    assert load_gguf(path)[0].rope_scaling == M.RopeScaling()


def test_a_lora_adapter_file_is_what_llama_cpp_adds_to_the_base_file(small, tmp_path):
    """llama.cpp computes W + (alpha / r) lora_b @ lora_a on the base file's weights (rows in its order);
    that must be the merged model's weights as the model file holds them."""
    config, params, tokenizer = small
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=4, alpha=8.0)), params, jax.random.key(1))
    rng = np.random.default_rng(2)
    adapted = A.targets.map_paths(lambda _, leaf: leaf.replace(b=rng.normal(0, 0.05, leaf.b.shape).astype(np.float32))
                                  if isinstance(leaf, A.LoRAWeight) else leaf, adapted)
    path = A.export_gguf_lora(tmp_path / "lora.gguf", config, adapted)
    reader = read_gguf(path)
    metadata = read_gguf_metadata(path)
    assert (metadata["general.type"], metadata["adapter.type"], metadata["general.architecture"]) == (
        "adapter", "lora", "llama")
    lora = {t.name: np.asarray(t.data, np.float32).reshape([int(n) for n in reversed(t.shape)])
            for t in reader.tensors}
    rank = 4
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    module = "model.layers.1.self_attn.v_proj"
    assert lora[f"{name_map.get_name(module)}.weight.lora_a"].shape == (rank, config.hidden_size)
    base = _gguf_weights(config, params, tmp_path / "base.gguf", tokenizer)
    merged = _gguf_weights(config, A.merge(adapted), tmp_path / "merged.gguf", tokenizer)
    pairs = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(pairs) == config.num_layers * 7 and all(f"{p}.lora_b" in lora for p in pairs)  # every projection
    for weight in pairs:
        llama_cpp = base[weight] + metadata["adapter.lora.alpha"] / rank * lora[f"{weight}.lora_b"] @ lora[
            f"{weight}.lora_a"]
        np.testing.assert_allclose(llama_cpp, merged[weight], atol=1e-5, err_msg=weight)
    assert not np.allclose(base["blk.0.attn_q.weight"], merged["blk.0.attn_q.weight"])


def _gguf_weights(config, params, path, tokenizer) -> dict[str, np.ndarray]:
    """Every tensor of the F32 GGUF of `params`, as the file holds it (llama.cpp's row order)."""
    save_gguf(path, config, params, tokenizer, file_type="f32")
    return {t.name: np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in read_gguf(path).tensors}


@pytest.mark.parametrize("method", ["lora_ga_like", "boft"])
def test_trees_that_are_not_plain_lora_are_refused_pointing_to_the_merged_export(small, tmp_path, method):
    config, params, _ = small
    if method == "boft":
        adapted = A.apply(A.AdapterSpec.for_method(A.BOFTConfig(block_size=8)), params, jax.random.key(0))
    else:  # LoRA-GA's weights are LoRA with an offset folded into the base: PEFT and GGUF cannot hold them
        lora = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=4, alpha=8.0)), params, jax.random.key(0))
        adapted = A.targets.map_paths(lambda _, leaf: A.LoRAGAWeight(base=leaf.base, a=leaf.a, b=leaf.b, a0=leaf.a,
                                                                     b0=leaf.b, scale=leaf.scale)
                                      if isinstance(leaf, A.LoRAWeight) else leaf, lora)
    with pytest.raises(ValueError, match="merged"):
        A.export_gguf_lora(tmp_path / "lora.gguf", config, adapted)
    assert not list(tmp_path.iterdir())


def test_a_tokenizer_llama_cpp_cannot_split_alike_is_refused_before_writing(small, tmp_path):
    config, params, tokenizer = small
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Punctuation(),
                                                                tokenizers.pre_tokenizers.ByteLevel()])
    odd = HFTokenizer(backend, bos_id=None, eos_id=tokenizer.eos_id, pad_id=None, unk_id=None, add_bos=False,
                      chat_template=None)
    with pytest.raises(GGUFTokenizerError, match="Punctuation.*smollm"):
        save_gguf(tmp_path / "model.gguf", config, params, odd)
    with pytest.raises(ValueError, match="file type 'q4_k' is not one of"):
        save_gguf(tmp_path / "model.gguf", config, params, tokenizer, file_type="q4_k")
    assert not list(tmp_path.iterdir())


def test_export_settings_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="export.gguf.*q4_k.*bf16"):
        load_config(None, ["export.gguf=q4_k"])
    with pytest.raises(ConfigError, match="export.gguf_lora=true, but method.name='boft'"):
        load_config(None, ["method.name=boft", "export.peft_adapter=false", "export.gguf_lora=true"])
    assert load_config(None, ["export.gguf=q8_0", "export.gguf_lora=true"]).export.requested



@pytest.mark.slow
def test_the_real_model_exported_as_q8_0_keeps_its_logits_in_transformers(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct re-exported as Q8_0 with its tokenizer: transformers reads the file (weights
    and tokenizer) as we do, and the next-token predictions of a real sentence barely move."""
    config, params = load_gguf(smollm2_gguf)
    tokenizer = load_tokenizer(smollm2_gguf)
    path = save_gguf(tmp_path / "smollm2-q8_0.gguf", config, params, tokenizer, file_type="q8_0")
    ids = np.asarray([tokenizer.encode("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.")])
    original = np.asarray(_apply(config, params, ids))
    found_config, found = load_gguf(path)
    ours = np.asarray(_apply(found_config, found, ids))
    np.testing.assert_allclose(_transformers_logits(path, ids), ours, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == original.argmax(-1)).mean() >= 0.9
    assert np.abs(ours - original).max() < 0.05 * np.abs(original).max()
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert theirs(TEXTS[1], add_special_tokens=False)["input_ids"] == tokenizer.encode(TEXTS[1], add_bos=False)
