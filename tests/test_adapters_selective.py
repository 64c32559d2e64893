"""Hybrid-LoRA: selectively fully trained layers (`SelectiveWeight`), module scores and budgets, the
selection's spec, and PEFT export with `modules_to_save`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.methods.hybrid_lora import SCORES as SCORE_KINDS
from hyjax.methods.hybrid_lora import ScoredModule, Selection, module_scores, select_modules
from hyjax.weights import save_hf_checkpoint

TINY = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2)
TOKENS = np.random.default_rng(1).integers(0, 64, (2, 10))
LORA = A.LoRAConfig(rank=4, alpha=8.0)
# q_proj: layer 1 fully trained; down_proj: layers 0 and 3; o_proj: every layer; the rest LoRA.
CHOSEN = {"layers/attn/q_proj": (1,), "layers/attn/k_proj": (), "layers/attn/v_proj": (),
          "layers/attn/o_proj": (0, 1, 2, 3), "layers/mlp/gate_proj": (), "layers/mlp/up_proj": (),
          "layers/mlp/down_proj": (3, 0)}
_apply = jax.jit(M.apply, static_argnums=0)


def _randomize(adapted, seed=0, std=0.1):
    """Random nonzero LoRA factors, and fully trained weights moved away from their base."""
    rng = np.random.default_rng(seed)

    def normal(like, mean=0.0):
        return jnp.asarray(mean + rng.normal(0, std, like.shape), like.dtype)

    def fill(_, leaf):
        if isinstance(leaf, (A.LoRAWeight, A.SelectiveWeight)):
            leaf = leaf.replace(a=normal(leaf.a), b=normal(leaf.b))
        if isinstance(leaf, A.SelectiveWeight):
            return leaf.replace(full=normal(leaf.full, leaf.full))
        if isinstance(leaf, A.FullWeight):
            return leaf.replace(base=normal(leaf.base, leaf.base))
        return leaf
    return A.targets.map_paths(fill, adapted)


def _adapted(config, params, chosen=CHOSEN, seed=0):
    spec = A.selective_spec(chosen, LORA, config.num_layers)
    return _randomize(A.apply(spec, params, jax.random.key(seed)), seed)


@pytest.fixture(scope="module")
def params():
    return M.init_params(TINY, jax.random.key(0))


def _loss(params, tokens=TOKENS):
    logits = M.apply(TINY, params, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


# ------------------------------------------------------------------------------- the node


def test_spec_maps_nothing_some_all_chosen_to_lora_selective_full(params):
    spec = A.selective_spec({**CHOSEN, "lm_head": (0,)}, LORA, TINY.num_layers)
    methods = dict((pattern.replace("\\", ""), method) for pattern, method in spec.rules)
    assert methods["layers/attn/k_proj"] == LORA and methods["lm_head"] == A.FullConfig()
    assert methods["layers/attn/o_proj"] == A.FullConfig()
    assert methods["layers/mlp/down_proj"] == A.SelectiveConfig(LORA, (0, 3))
    adapted = A.apply(spec, params, jax.random.key(0))
    kinds = {path: type(leaf).__name__ for path, leaf in A.targets.iter_paths(adapted)}
    assert kinds["layers/attn/q_proj"] == kinds["layers/mlp/down_proj"] == "SelectiveWeight"
    assert kinds["layers/attn/v_proj"] == "LoRAWeight" and kinds["layers/attn/o_proj"] == "FullWeight"
    assert kinds["lm_head"] == "FullWeight" and kinds["embed"] == "ArrayImpl"
    down = adapted["layers"]["mlp"]["down_proj"]
    np.testing.assert_array_equal(down.chosen, [0, 3])
    np.testing.assert_array_equal(down.full, params["layers"]["mlp"]["down_proj"][np.array([0, 3])])
    # LoRA initialised exactly as plain LoRA with the same key: A Kaiming-uniform, B zero.
    base, key = params["layers"]["mlp"]["down_proj"], jax.random.key(5)
    node, plain = (method.init_stacked(base, key, None, 1) for method in (A.SelectiveConfig(LORA, (3, 0)), LORA))
    np.testing.assert_array_equal(node.a, plain.a)
    assert not np.any(np.asarray(node.b)) and node.scale == plain.scale == 2.0
    counts = A.count_trainable(adapted)
    assert counts["full"] == 4 * 32 * 32 + 32 * 64 and counts["hybrid_lora"] == (
        4 * 4 * (32 + 32) + 32 * 32 + 4 * 4 * (48 + 32) + 2 * 48 * 32)


def test_spec_and_config_errors_name_the_problem(params):
    with pytest.raises(ValueError, match=r"chosen layers \[4\] of layers/attn/q_proj are outside 0..3"):
        A.selective_spec({"layers/attn/q_proj": (4,)}, LORA, 4)
    with pytest.raises(ValueError, match=r"chosen=\(1, 1\) repeats a layer"):
        A.SelectiveConfig(LORA, (1, 1))
    with pytest.raises(ValueError, match=r"chosen layers \[7\] are outside 0..3"):
        A.SelectiveConfig(LORA, (7,)).init_stacked(params["layers"]["attn"]["q_proj"], jax.random.key(0), None, 1)
    with pytest.raises(ValueError, match=r"stacked over one layer axis; got shape \(32, 64\) with 0 .*FullConfig"):
        A.apply(A.AdapterSpec((("lm_head", A.SelectiveConfig(LORA, (0,))),)), params, jax.random.key(0))
    node = A.apply(A.selective_spec(CHOSEN, LORA, 4), params, jax.random.key(0))["layers"]["attn"]["q_proj"]
    with pytest.raises(TypeError, match="scan_form"):
        node.apply_to(jnp.ones((2, 32)))


def test_logits_equal_the_merged_model_and_a_hand_computed_projection(params):
    adapted = _adapted(TINY, params)
    merged = A.merge(adapted)
    ours = np.asarray(_apply(TINY, adapted, TOKENS))
    assert np.max(np.abs(ours - np.asarray(_apply(TINY, params, TOKENS)))) > 1e-2
    np.testing.assert_allclose(ours, _apply(TINY, merged, TOKENS), atol=1e-5)

    # Cached decoding (generation) goes through the same conversion.
    cache = M.KVCache.empty(TINY, 2, 16)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    valid = jnp.ones((2, 10), bool)
    decoded = [M.decode(TINY, p, jnp.asarray(TOKENS), positions, valid, cache)[0] for p in (adapted, merged)]
    np.testing.assert_allclose(decoded[0], decoded[1], atol=1e-5)
    np.testing.assert_allclose(decoded[0], ours, atol=1e-5)

    q = adapted["layers"]["attn"]["q_proj"]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 32)), jnp.float32)
    per_layer = q.scan_form()
    layer = lambda i: jax.tree.map(lambda leaf: leaf[i], per_layer)  # noqa: E731  what the scan sees
    np.testing.assert_allclose(layer(1).apply_to(x), x @ q.full[0], atol=1e-6)
    hand = x @ q.base[2] + q.scale * (x @ q.a[2]) @ q.b[2]
    assert np.max(np.abs(hand - x @ q.base[2])) > 1e-2
    np.testing.assert_allclose(layer(2).apply_to(x), hand, atol=1e-5)
    np.testing.assert_array_equal(merged["layers"]["attn"]["q_proj"][1], q.full[0])
    np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"][2], q.base[2] + q.scale * q.a[2] @ q.b[2], atol=1e-6)


def test_full_gets_the_true_gradient_and_lora_none_on_chosen_layers(params):
    adapted = _adapted(TINY, params)
    trainable, frozen = A.split_trainable(adapted)
    grads = jax.grad(lambda t: _loss(A.combine(t, frozen)))(trainable)
    merged = A.merge(adapted)
    plain = jax.grad(lambda m: _loss(m))(merged)
    for path, chosen in (("layers/attn/q_proj", [1]), ("layers/mlp/down_proj", [0, 3])):
        group, name = path.split("/")[1:]
        g = grads["layers"][group][name]
        want = plain["layers"][group][name][np.array(chosen)]
        assert np.max(np.abs(want)) > 1e-4
        np.testing.assert_allclose(g["full"], want, atol=1e-6, rtol=1e-4)
        others = [i for i in range(4) if i not in chosen]
        for factor in ("a", "b"):
            assert not np.any(np.asarray(g[factor])[np.array(chosen)])
            assert all(np.max(np.abs(g[factor][i])) > 1e-6 for i in others)


def test_merge_unmerge_round_trip(params):
    adapted = _adapted(TINY, params)
    back = A.unmerge(A.merge(adapted), adapted)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, adapted)

    q = adapted["layers"]["attn"]["q_proj"]
    target = q.merged() + jnp.asarray(np.random.default_rng(3).normal(0, 0.1, q.base.shape), jnp.float32)
    node = q.unmerge(target)
    np.testing.assert_allclose(node.merged(), target, atol=1e-6)
    np.testing.assert_array_equal(node.full, target[np.array([1])])
    np.testing.assert_array_equal(node.base[1], q.base[1])  # a chosen layer's base is not in the merged weight
    np.testing.assert_allclose(node.base[0], target[0] - q.scale * q.a[0] @ q.b[0], atol=1e-6)


# --------------------------------------------------------------------------------- scores


def _numpy_scores(g, r):
    s = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
    total, residual = np.sum(s ** 2), np.sum(s[r:] ** 2)
    return {"grad_norm": np.sqrt(total), "residual_share": residual / total, "residual_norm": np.sqrt(residual),
            "grad_norm_x_residual": np.sqrt(total) * residual / total}


def test_scores_match_numpy_and_rank_full_rank_gradients_first():
    rng = np.random.default_rng(0)
    full_rank = rng.normal(size=(16, 12))
    rank_one = np.outer(rng.normal(size=16), rng.normal(size=12))
    other = rng.normal(size=(12, 16)) * np.linspace(1, 0.01, 16)
    layers = np.stack([full_rank / np.linalg.norm(full_rank), rank_one / np.linalg.norm(rank_one)])
    gradients = {"layers": {"attn": {"q_proj": jnp.asarray(layers, jnp.float32)}}, "lm_head": jnp.asarray(other)}
    for kind in set(SCORE_KINDS) - {"random"}:
        scores = module_scores(gradients, rank=2, score=kind)
        assert scores["layers/attn/q_proj"].shape == (2,) and scores["lm_head"].shape == (1,)
        for got, g in ((scores["layers/attn/q_proj"][0], layers[0]), (scores["layers/attn/q_proj"][1], layers[1]),
                       (scores["lm_head"][0], other)):
            np.testing.assert_allclose(got, _numpy_scores(g, 2)[kind], rtol=1e-4, atol=1e-6)
    default = module_scores(gradients, rank=2)["layers/attn/q_proj"]
    assert default[0] > 0.5 and default[1] < 1e-3  # same norm; a rank-2 adapter captures all of the rank-1 one
    with pytest.raises(ValueError, match="unknown module score 'norm'"):
        module_scores(gradients, rank=2, score="norm")


def test_random_scores_are_uniform_draws_of_the_key_and_fill_the_same_budget():
    gradients = {"layers": {"attn": {"q_proj": jnp.zeros((30, 4, 4))}, "mlp": {"up_proj": jnp.zeros((30, 4, 8))}}}
    draws = [module_scores(gradients, rank=2, score="random", key=jax.random.key(seed)) for seed in (0, 0, 1)]
    for path in ("layers/attn/q_proj", "layers/mlp/up_proj"):
        np.testing.assert_array_equal(draws[0][path], draws[1][path])  # the key decides
        assert not np.array_equal(draws[0][path], draws[2][path])
        assert draws[0][path].shape == (30,) and np.all((draws[0][path] >= 0) & (draws[0][path] < 1))
    assert not np.array_equal(draws[0]["layers/attn/q_proj"], draws[0]["layers/mlp/up_proj"])
    sizes = {"layers/attn/q_proj": 16, "layers/mlp/up_proj": 32}
    chosen = [select_modules(d, sizes, fraction=0.1) for d in (draws[0], draws[2])]
    assert [sum(map(len, c.values())) for c in chosen] == [6, 6] and chosen[0] != chosen[1]


def test_randomized_scores_above_the_limit_agree_with_exact():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(96, 64)))
    v, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    g = jnp.asarray([(u * 0.85 ** np.arange(64)) @ v.T, (u * 0.95 ** np.arange(64)) @ v.T], jnp.float32)
    gradients = {"layers": {"mlp": {"up_proj": g}}}
    for kind in ("grad_norm_x_residual", "residual_share"):
        exact = module_scores(gradients, 4, kind)["layers/mlp/up_proj"]
        randomized = module_scores(gradients, 4, kind, exact_limit=32)["layers/mlp/up_proj"]
        assert not np.array_equal(exact, randomized)
        np.testing.assert_allclose(randomized, exact, rtol=1e-3)
        assert np.all(randomized >= exact * (1 - 1e-5))  # a lower bound of the top-r energy


# --------------------------------------------------------------------------------- budgets


SCORES = {"layers/attn/q_proj": np.array([0.5, 3.0, 1.0, 0.2]), "layers/mlp/up_proj": np.array([2.0, 0.1, 3.0, 0.4]),
          "lm_head": np.array([0.9])}
SIZES = {"layers/attn/q_proj": 100, "layers/mlp/up_proj": 300, "lm_head": 250}


def test_fraction_budget_takes_the_highest_scored_modules():
    # 9 modules: floor(0.1 * 9) = 0, at least 1; a tie at 3.0 goes to the first path.
    assert select_modules(SCORES, SIZES) == {"layers/attn/q_proj": (1,), "layers/mlp/up_proj": (), "lm_head": ()}
    assert select_modules(SCORES, SIZES, fraction=0.34) == {
        "layers/attn/q_proj": (1,), "layers/mlp/up_proj": (0, 2), "lm_head": ()}
    assert select_modules(SCORES, SIZES, fraction=0.0) == {path: () for path in SCORES}
    assert sum(map(len, select_modules(SCORES, SIZES, fraction=1.0).values())) == 9


def test_parameter_budget_is_filled_greedily_and_never_exceeded():
    # Order: q1 (100), up2 (300), up0 (300), q2 (100), lm_head (250), q0, up3, q3, up1.
    # q1 + up2 = 400; up0 does not fit in the 250 left, q2 does (150 left), lm_head not, q0 does (50 left).
    chosen = select_modules(SCORES, SIZES, fraction=0.5, max_params=650)  # the parameter budget rules
    assert chosen == {"layers/attn/q_proj": (0, 1, 2), "layers/mlp/up_proj": (2,), "lm_head": ()}
    assert select_modules(SCORES, SIZES, max_params=1050) == {  # exactly the top five
        "layers/attn/q_proj": (1, 2), "layers/mlp/up_proj": (0, 2), "lm_head": (0,)}
    assert select_modules(SCORES, SIZES, max_params=1049) == {  # lm_head skipped, then q0 and q3 fit
        "layers/attn/q_proj": (0, 1, 2, 3), "layers/mlp/up_proj": (0, 2), "lm_head": ()}
    assert select_modules(SCORES, SIZES, max_params=99) == {path: () for path in SCORES}
    with pytest.raises(ValueError, match=r"fraction=1.5 .* must be in \[0, 1\]"):
        select_modules(SCORES, SIZES, fraction=1.5)
    with pytest.raises(ValueError, match="max_params=-1"):
        select_modules(SCORES, SIZES, max_params=-1)
    with pytest.raises(ValueError, match="score of lm_head layer 0 is nan"):
        select_modules({**SCORES, "lm_head": np.array([np.nan])}, SIZES)


def test_selection_record_round_trips_through_json_and_prints_a_table():
    chosen = select_modules(SCORES, SIZES, max_params=650)
    selection = Selection.build(SCORES, SIZES, chosen, "grad_norm_x_residual", 8)
    assert selection.chosen_layers() == chosen
    assert selection.modules[1] == ScoredModule("layers/attn/q_proj", 1, 3.0, 100, True)
    data = json.loads(json.dumps(selection.to_json()))
    assert Selection.from_json(data) == selection
    table = selection.table(top=3)
    assert "4 of 9 modules trained fully, 600 of 1,850 target parameters (32.4%)" in table
    assert table.splitlines()[2].split()[:2] == ["layers/attn/q_proj[1]", "3"]
    assert len(table.splitlines()) == 5


# ------------------------------------------------------------------------------ PEFT export


def test_peft_export_with_modules_to_save_gives_our_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # 12 layers: layer 1's modules must not match layer 11's in PEFT's name matching.
    config = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=12, num_heads=4,
                           num_kv_heads=2)
    params = M.init_params(config, jax.random.key(0))
    base_folder = save_hf_checkpoint(tmp_path / "base", config, params)
    chosen = {**{path: () for path in CHOSEN}, "layers/attn/q_proj": (1,), "layers/mlp/down_proj": (0, 10),
              "layers/attn/o_proj": tuple(range(12))}
    adapted = _adapted(config, params, chosen)
    ours = np.asarray(_apply(config, adapted, TOKENS))
    A.export_peft(tmp_path / "adapter", config, adapted, str(base_folder))

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    saved = (["model.layers.1.self_attn.q_proj"] + [f"model.layers.{i}.self_attn.o_proj" for i in range(12)]
             + ["model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj"])
    assert sorted(written["modules_to_save"]) == sorted(saved)
    assert len(written["target_modules"]) == 7 * 12 - len(saved)
    assert "model.layers.11.self_attn.q_proj" in written["target_modules"]
    assert "model.layers.1.self_attn.q_proj" not in written["target_modules"]

    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.max(np.abs(ours - np.asarray(_apply(config, params, TOKENS)))) > 1e-2
    assert float(np.max(np.abs(theirs - ours))) < 1e-4

    modules = dict(model.named_modules())
    layers = "base_model.model.model.layers"
    down = adapted["layers"]["mlp"]["down_proj"]
    for j, i in enumerate((0, 10)):
        module = modules[f"{layers}.{i}.mlp.down_proj"]
        assert isinstance(module, peft.utils.ModulesToSaveWrapper)
        weight = module.modules_to_save["default"].weight.detach().numpy()
        np.testing.assert_array_equal(weight, np.asarray(down.full[j]).T)
    o_weight = modules[f"{layers}.5.self_attn.o_proj"].modules_to_save["default"].weight.detach().numpy()
    np.testing.assert_array_equal(o_weight, np.asarray(adapted["layers"]["attn"]["o_proj"].base[5]).T)
    assert isinstance(modules[f"{layers}.11.self_attn.q_proj"], peft.tuners.lora.LoraLayer)
    assert not hasattr(modules[f"{layers}.1.self_attn.q_proj"], "lora_A")
    with pytest.raises(ValueError, match="modules_to_save=.*not supported by import_peft"):
        A.import_peft(tmp_path / "adapter", config, params)


def test_peft_export_refuses_full_non_projections_and_mixed_hyperparameters(params, tmp_path):
    spec = A.AdapterSpec((("embed", A.FullConfig()), ("layers/attn/q_proj", LORA)))
    with pytest.raises(ValueError, match="embed is trained fully.*projections.*export_merged"):
        A.export_peft(tmp_path, TINY, A.apply(spec, params, jax.random.key(0)), "base")
    spec = A.AdapterSpec((("layers/attn/q_proj", A.SelectiveConfig(A.LoRAConfig(rank=2), (1,))),
                          ("layers/attn/v_proj", LORA)))
    with pytest.raises(ValueError, match="differ in method or hyperparameters.*export_merged"):
        A.export_peft(tmp_path, TINY, A.apply(spec, params, jax.random.key(0)), "base")
    spec = A.AdapterSpec((("layers/attn/q_proj", A.FullConfig()),))
    with pytest.raises(ValueError, match="every adapted weight.*is a FullWeight.*export_merged"):
        A.export_peft(tmp_path, TINY, A.apply(spec, params, jax.random.key(0)), "base")
    assert not (tmp_path / "adapter_model.safetensors").exists()
