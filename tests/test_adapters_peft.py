"""PEFT-format export and import: our adapters load in Hugging Face PEFT with the same logits, PEFT's
adapters load in ours, and trees PEFT cannot represent are refused in favour of a merged checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.weights import load_gguf, load_hf_checkpoint, save_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")

TINY = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
TOKENS = np.random.default_rng(1).integers(0, 64, (2, 10))
_apply = jax.jit(M.apply, static_argnums=0)


def _randomize(adapted, seed, std):
    """Random nonzero adapter parameters: LoRA A, B ~ N(0, std); BOFT r ~ N(0, std), s ~ N(1, std / 4)."""
    rng = np.random.default_rng(seed)

    def normal(mean, scale, like):
        return jnp.asarray(rng.normal(mean, scale, like.shape), jnp.float32)

    def fill(_, leaf):
        if isinstance(leaf, A.LoRAWeight):
            return leaf.replace(a=normal(0, std, leaf.a), b=normal(0, std, leaf.b))
        if isinstance(leaf, A.BOFTWeight):
            return leaf.replace(r=normal(0, std, leaf.r), s=normal(1, std / 4, leaf.s))
        return leaf
    return A.targets.map_paths(fill, adapted)


def _peft_logits(base_folder, adapter_folder, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter_folder).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def _adapted(config, params, method, seed=0, std=0.05, targets=None):
    adapted = A.apply(A.AdapterSpec.for_method(method, targets), params, jax.random.key(seed))
    return _randomize(adapted, seed, std)


# ------------------------------------------------------------------------------ tiny model, fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    params = M.init_params(TINY, jax.random.key(0))
    folder = save_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "base", TINY, params)
    return params, folder


METHODS = {
    "lora": A.LoRAConfig(rank=4, alpha=8.0),
    "lora_rslora": A.LoRAConfig(rank=4, alpha=8.0, rslora=True),
    "oft": A.BOFTConfig(block_size=8),
    "boft_m2": A.BOFTConfig(block_size=4, n_factors=2),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_tiny_export_loads_in_peft_and_imports_back(name, tiny, tmp_path, peft_butterfly):
    params, base_folder = tiny
    targets = [A.targets.PROJECTIONS, "lm_head"]
    adapted = _adapted(TINY, params, METHODS[name], std=0.3, targets=targets)
    ours = np.asarray(_apply(TINY, adapted, TOKENS))
    assert np.max(np.abs(ours - np.asarray(_apply(TINY, params, TOKENS)))) > 1e-2

    A.export_peft(tmp_path, TINY, adapted, str(base_folder))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "lm_head"])
    diff = float(np.max(np.abs(_peft_logits(base_folder, tmp_path, TOKENS) - ours)))
    print(f"tiny {name}: PEFT vs ours max abs logit diff {diff:.2e}")
    assert diff < 5e-5  # transformers vs ours on the bare tiny model: ~2e-5

    imported = A.import_peft(tmp_path, TINY, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), imported, adapted)
    q = imported["layers"]["attn"]["q_proj"]
    if isinstance(q, A.LoRAWeight):
        assert q.scale == pytest.approx(adapted["layers"]["attn"]["q_proj"].scale)
    np.testing.assert_allclose(_apply(TINY, imported, TOKENS), ours, atol=1e-6)


def test_tiny_peft_lora_on_some_layers_imports_with_identity_elsewhere(tiny, tmp_path):
    params, base_folder = tiny
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj"], layers_to_transform=[1])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        want = model.eval()(torch.tensor(TOKENS)).logits.numpy()
    imported = A.import_peft(tmp_path, TINY, params)
    v = imported["layers"]["attn"]["v_proj"]
    assert isinstance(v, A.LoRAWeight) and v.scale == 1.5 and not np.any(np.asarray(v.b[0]))
    assert isinstance(imported["layers"]["attn"]["q_proj"], jax.Array)
    np.testing.assert_allclose(_apply(TINY, imported, TOKENS), want, atol=1e-5)


@pytest.mark.parametrize("method,what", [
    (A.FullConfig(), "FullWeight"),
    (A.BOFTConfig(block_size=8, neumann_terms=4), "Neumann"),
])
def test_unrepresentable_trees_are_refused_pointing_to_export_merged(tiny, tmp_path, method, what):
    params, _ = tiny
    targets = A.targets.PROJECTIONS if what == "Neumann" else None
    adapted = A.apply(A.AdapterSpec.for_method(method, targets), params, jax.random.key(0))
    with pytest.raises(ValueError, match=f"{what}.*export_merged") as err:
        A.export_peft(tmp_path, TINY, adapted, "base")
    assert "PEFT cannot represent" in str(err.value)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_mixed_methods_are_refused(tiny, tmp_path):
    params, _ = tiny
    spec = A.AdapterSpec((("layers/attn/q_proj", A.LoRAConfig(rank=2)), ("layers/attn/v_proj", A.BOFTConfig())))
    adapted = A.apply(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match="differ in method or hyperparameters.*export_merged"):
        A.export_peft(tmp_path, TINY, adapted, "base")


def test_export_merged_writes_a_plain_checkpoint_with_the_adapted_logits(tiny, tmp_path):
    params, _ = tiny
    adapted = _adapted(TINY, params, A.BOFTConfig(block_size=4, n_factors=2), std=0.3)
    folder = A.export_merged(tmp_path / "merged", TINY, adapted)
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    config, merged = load_hf_checkpoint(folder)
    np.testing.assert_allclose(_apply(config, merged, TOKENS), _apply(TINY, adapted, TOKENS), atol=2e-5)


def test_import_errors_name_the_problem(tiny, tmp_path):
    params, _ = tiny
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        A.import_peft(tmp_path, TINY, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="peft_type='IA3' is not supported"):
        A.import_peft(tmp_path, TINY, params)


# ------------------------------------------------------------------------ real SmolLM2-135M, slow


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    from hyjax.tokenization import load_tokenizer

    config, params = load_gguf(smollm2_gguf)
    folder = save_hf_checkpoint(tmp_path_factory.mktemp("smollm2") / "base", config, params)
    tokens = np.asarray([load_tokenizer(smollm2_gguf).encode(
        "Adapters trained in JAX should load in PEFT and give the very same next-token logits.")])
    base_logits = np.asarray(_apply(config, params, tokens))
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        floor = float(np.max(np.abs(model(torch.tensor(tokens)).logits.numpy() - base_logits)))
    print(f"SmolLM2 base model, transformers vs ours: max abs logit diff {floor:.2e}")
    return config, params, folder, tokens, base_logits


def _check_close(label, ours, theirs, base_logits, tol=5e-4):
    """Adapted logits agree to about the bare model's transformers-vs-ours difference (~1e-4)."""
    diff = float(np.max(np.abs(ours - theirs)))
    effect = float(np.max(np.abs(ours - base_logits)))
    print(f"{label}: max abs logit diff {diff:.2e} (the adapter moves logits by up to {effect:.2f})")
    assert effect > 0.5 and diff < tol


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [
    ("lora", A.LoRAConfig(rank=8, alpha=16.0)),
    ("oft", A.BOFTConfig(block_size=8, n_factors=1)),
    ("boft_m2", A.BOFTConfig(block_size=8, n_factors=2)),
])
def test_real_export_loads_in_peft_with_our_logits(name, method, smollm2, tmp_path, peft_butterfly):
    config, params, base_folder, tokens, base_logits = smollm2
    adapted = _adapted(config, params, method, seed=1, std=0.02)
    ours = np.asarray(_apply(config, adapted, tokens))
    A.export_peft(tmp_path, config, adapted, str(base_folder))
    _check_close(f"SmolLM2 {name} export -> PeftModel.from_pretrained vs ours", ours,
                 _peft_logits(base_folder, tmp_path, tokens), base_logits)


@pytest.mark.slow
def test_real_peft_trained_lora_imports_with_peft_logits(smollm2, tmp_path):
    config, params, base_folder, tokens, base_logits = smollm2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.tensor(tokens)
    model.train()
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        want = model.eval()(batch).logits.numpy()
    imported = A.import_peft(tmp_path, config, params)
    assert isinstance(imported["layers"]["mlp"]["down_proj"], A.LoRAWeight)
    _check_close("SmolLM2 PEFT-trained LoRA (rsLoRA) -> import_peft vs PEFT",
                 np.asarray(_apply(config, imported, tokens)), want, base_logits)


@pytest.mark.slow
def test_real_peft_boft_imports_with_peft_logits(smollm2, tmp_path, peft_butterfly):
    config, params, base_folder, tokens, base_logits = smollm2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.normal_(0, 0.02)
            elif "boft_s" in name:
                p.normal_(1, 0.01)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        want = model.eval()(torch.tensor(tokens)).logits.numpy()
    imported = A.import_peft(tmp_path, config, params)
    assert imported["layers"]["attn"]["q_proj"].r.shape == (30, 2, 576 // 8, 8 * 8)
    _check_close("SmolLM2 PEFT BOFT (b=8, m=2) -> import_peft vs PEFT", np.asarray(_apply(config, imported, tokens)),
                 want, base_logits)
