"""The hybrid-weights Optax transform: lambda from branch gradient norms (raw, or each against its own
warm-up scale), shares, hand-over, and real training with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters
from hyjax import model as M
from hyjax.adapters import BOFTConfig, HybridConfig, LoRAGAConfig, set_lambdas
from hyjax.adapters.lora_ga import estimate_gradients, next_token_loss
from hyjax.optim import HybridWeightsState, current_lambdas, hybrid_weights



def _lam(state):
    return current_lambdas(state)["layers"]["attn"]["q_proj"]


def _grads(boft_norms, lora_norms, mix="weight"):
    """A trainable tree with one stacked hybrid weight whose per-layer branch norms are given.

    With mix="weight" the BOFT branch is `boft_r` alone and `boft_s` (the whole projection's scale)
    gets a large norm of its own that must count for neither branch; with mix="update" the BOFT norm is
    split evenly over `boft_r` and `boft_s`."""
    def field(shape, norms, key):
        x = jax.random.normal(jax.random.key(key), (len(norms),) + shape)
        x = x / jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))
        return x * jnp.asarray(norms, jnp.float32).reshape((-1,) + (1,) * len(shape))

    # A branch's norm split evenly over two fields (sqrt(1/2) each).
    half = np.sqrt(0.5)
    boft = np.asarray(boft_norms, np.float32)
    r_norms, s_norms = (boft, np.full_like(boft, 50.0)) if mix == "weight" else (boft * half, boft * half)
    group = {"boft_r": field((2, 4, 4 * 4), r_norms, 0),
             "boft_s": field((16,), s_norms, 1),
             "lora_a": field((16, 2), np.asarray(lora_norms) * half, 2),
             "lora_b": field((2, 16), np.asarray(lora_norms) * half, 3)}
    return {"layers": {"attn": {"q_proj": group}}}


def _run(transform, grads_seq):
    state = transform.init(grads_seq[0])
    history = []
    for g in grads_seq:
        _, state = transform.update(g, state)
        history.append(np.asarray(_lam(state)))
    return state, history


@pytest.mark.parametrize("direction", ["proportional", "inverse"])
def test_lambda_moves_toward_the_larger_corrected_norm(direction):
    g = _grads([3.0, 1.0, 2.0], [1.0, 3.0, 2.0])  # layer 0: BOFT larger; 1: LoRA larger; 2: equal
    _, history = _run(hybrid_weights(rule="raw", direction=direction, warmup_steps=0), [g] * 5)
    lam = history[-1]
    if direction == "proportional":
        assert lam[0] > 0.55 and lam[1] < 0.45
    else:
        assert lam[0] < 0.45 and lam[1] > 0.55
    assert lam[2] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff([h[0] for h in history]) != 0)  # it keeps moving (EMA)


def test_ema_temperature_and_share_correction_by_hand():
    norms = [([2.0], [1.0]), ([1.0], [4.0]), ([5.0], [0.5])]
    beta, tau = 0.8, 2.0
    transform = hybrid_weights(rule="raw", temperature=tau, ema=beta, clip=(0.0, 1.0), warmup_steps=0)
    _, history = _run(transform, [_grads(b, l) for b, l in norms])
    lam, ema = 0.5, 0.5
    for (nb, nl), got in zip(norms, history):
        cb, cl = nb[0] / lam, nl[0] / (1 - lam)  # share-corrected norms
        target = cb ** (1 / tau) / (cb ** (1 / tau) + cl ** (1 / tau))
        ema = beta * ema + (1 - beta) * target
        lam = ema
        np.testing.assert_allclose(got, [lam], rtol=1e-5)
    assert abs(lam - 0.5) > 0.02


def test_no_share_correction_for_update_mix_and_updates_scaled():
    transform = hybrid_weights(rule="raw", mix="update", shares="sum", inner=optax.identity(), ema=0.0,
                               clip=(0.0, 1.0), warmup_steps=0)
    g = _grads([3.0], [1.0], mix="update")
    state = transform.init(g)
    updates, state = transform.update(g, state)
    lam = float(_lam(state)[0])
    assert lam == pytest.approx(0.75, rel=1e-5)  # 3 / (3 + 1): no division by the shares
    u, g0 = updates["layers"]["attn"]["q_proj"], g["layers"]["attn"]["q_proj"]
    np.testing.assert_allclose(u["boft_r"], lam * g0["boft_r"], rtol=1e-6)
    np.testing.assert_allclose(u["lora_b"], (1 - lam) * g0["lora_b"], rtol=1e-6)
    with pytest.raises(ValueError, match="inner="):
        hybrid_weights(mix="update")


def test_weight_mix_passes_gradients_through():
    g = _grads([3.0, 1.0], [1.0, 2.0])
    transform = hybrid_weights(rule="raw", warmup_steps=0)
    updates, _ = transform.update(g, transform.init(g))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
        np.testing.assert_array_equal(a, b)


def test_warmup_holds_one_half():
    _, history = _run(hybrid_weights(rule="raw", warmup_steps=3), [_grads([5.0], [1.0])] * 4)
    assert [float(h[0]) for h in history[:2]] == [0.5, 0.5]
    assert history[2][0] > 0.5 and history[3][0] > history[2][0]


def test_clip_bounds():
    _, history = _run(hybrid_weights(rule="raw", ema=0.0, clip=(0.1, 0.8), warmup_steps=0),
                      [_grads([1e6, 1e-6], [1e-6, 1e6])])
    np.testing.assert_allclose(history[-1], [0.8, 0.1])


def test_state_is_a_pytree_that_survives_jit_and_flattening():
    transform = optax.chain(hybrid_weights(rule="raw", warmup_steps=1, ema=0.5), optax.sgd(0.1))
    g = _grads([2.0, 1.0], [1.0, 1.0])
    state = transform.init(g)
    step = jax.jit(transform.update)
    _, jitted = step(g, state)
    _, eager = transform.update(g, state)
    leaves, treedef = jax.tree.flatten(jitted)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt[0], HybridWeightsState) and int(rebuilt[0].step) == 1
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(_lam(rebuilt)[0]) > 0.5
    with pytest.raises(ValueError, match="no hybrid_weights state"):
        current_lambdas(optax.sgd(0.1).init(g))


def _norm_sequence(boft, lora, scale_boft=1.0, scale_lora=1.0, mix="weight"):
    """Per-update gradients of one layer whose branch norms follow `boft`, `lora` times a constant scale."""
    return [_grads([scale_boft * b], [scale_lora * l], mix=mix) for b, l in zip(boft, lora)]


def test_normalized_rule_is_scale_free_and_raw_is_not():
    """A branch parameterised 5x larger (all its gradients 5x) moves the normalized rule's lambda not at
    all; the raw rule's lambda is pulled far from 0.5 by it."""
    boft = [1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 0.6, 0.5, 0.4, 0.4]
    lora = [1.0, 0.9, 1.1, 1.0, 0.8, 0.9, 0.9, 1.0, 1.1, 1.0]
    common = dict(warmup_steps=4, ema=0.5, clip=(0.0, 1.0), mix="update", shares="unit", inner=optax.identity())
    _, plain = _run(hybrid_weights(rule="normalized", **common), _norm_sequence(boft, lora, mix="update"))
    _, scaled = _run(hybrid_weights(rule="normalized", **common),
                     _norm_sequence(boft, lora, scale_lora=5.0, mix="update"))
    np.testing.assert_allclose(np.stack(scaled), np.stack(plain), rtol=1e-5)
    assert plain[-1][0] < 0.45  # BOFT's gradient fell to 0.4x of its warm-up scale, LoRA-GA's did not
    _, raw = _run(hybrid_weights(rule="raw", **common), _norm_sequence(boft, lora, scale_lora=5.0, mix="update"))
    assert raw[-1][0] < 0.2


def test_normalized_rule_by_hand():
    """lambda holds 0.5 over the warm-up, whose norms set each branch's scale (the running mean until
    the warm-up ends); after it, each norm over its scale, through the EMA."""
    boft, lora = [2.0, 4.0, 1.0, 6.0, 3.0], [1.0, 1.0, 2.0, 1.0, 0.5]
    beta, warmup, tau = 0.6, 2, 0.5
    transform = hybrid_weights(rule="normalized", warmup_steps=warmup, ema=beta, temperature=tau, clip=(0.0, 1.0),
                               mix="update", shares="sum", inner=optax.identity())
    _, history = _run(transform, _norm_sequence(boft, lora, mix="update"))
    sums, ema = np.zeros(2), 0.5
    for t, (nb, nl) in enumerate(zip(boft, lora)):
        if t < warmup:
            sums += (nb, nl)
        scale = sums / min(t + 1, warmup)
        rb, rl = nb / scale[0], nl / scale[1]
        ema = beta * ema + (1 - beta) * rb ** (1 / tau) / (rb ** (1 / tau) + rl ** (1 / tau))
        expected = 0.5 if t + 1 < warmup else ema
        np.testing.assert_allclose(history[t], [expected], rtol=1e-5, err_msg=f"update {t}")
    assert history[-1][0] > 0.6  # BOFT's norm ended at 1x its scale (3), LoRA-GA's at 0.5x (1)


def test_unit_shares_keep_each_branch_at_its_own_rate_at_one_half():
    transform = hybrid_weights(rule="raw", mix="update", shares="unit", inner=optax.identity(), ema=0.0,
                               clip=(0.0, 1.0), warmup_steps=0)
    g = _grads([3.0], [1.0], mix="update")
    updates, state = transform.update(g, transform.init(g))
    lam = float(_lam(state)[0])
    u, g0 = updates["layers"]["attn"]["q_proj"], g["layers"]["attn"]["q_proj"]
    np.testing.assert_allclose(u["boft_s"], 2 * lam * g0["boft_s"], rtol=1e-6)
    np.testing.assert_allclose(u["lora_a"], 2 * (1 - lam) * g0["lora_a"], rtol=1e-6)
    held = hybrid_weights(rule="raw", mix="update", shares="unit", inner=optax.identity(), warmup_steps=5)
    updates, _ = held.update(g, held.init(g))  # lambda 0.5 in the warm-up: the updates pass unchanged
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_handover_moves_the_prior_and_layers_move_off_it():
    """With equal relative signals lambda follows the hand-over line from 0.2 to 0.8 (the EMA a little
    behind); a layer whose BOFT gradient grew relative to its scale sits above the line."""
    n = 40
    boft_layers = np.ones((n, 2))
    boft_layers[10:, 1] = 2.0  # layer 1's BOFT gradient doubles after the warm-up
    grads = [_grads(boft_layers[t], [1.0, 1.0], mix="update") for t in range(n)]
    transform = hybrid_weights(rule="normalized", warmup_steps=5, ema=0.5, clip=(0.0, 1.0), handover=(0.2, 0.8),
                               total_steps=n, mix="update", inner=optax.identity())
    _, history = _run(transform, grads)
    assert history[0][0] == pytest.approx(0.2 + 0.6 / n, abs=1e-6)  # the warm-up holds the prior of the next update
    line = 0.2 + 0.6 * np.arange(1, n + 1) / n
    np.testing.assert_allclose([h[0] for h in history[10:]], line[10:], atol=0.03)
    assert all(h[1] > h[0] + 0.05 for h in history[15:])


def test_bad_settings_are_refused():
    for kwargs, match in [(dict(direction="up"), "direction"), (dict(temperature=0.0), "temperature"),
                          (dict(ema=1.0), "ema"), (dict(clip=(0.9, 0.1)), "clip"), (dict(mix="sum"), "mix"),
                          (dict(rule="adam"), "rule"), (dict(shares="half"), "shares"),
                          (dict(warmup_steps=0), "needs at least 1"), (dict(handover=(0.2, 0.8)), "total_steps"),
                          (dict(handover=(0.0, 0.8), total_steps=10), "strictly between")]:
        with pytest.raises(ValueError, match=match):
            hybrid_weights(**kwargs)
    with pytest.raises(ValueError, match="no hybrid adapter"):
        hybrid_weights().init({"w": jnp.zeros(3)})


def _train(config, params, batch, grads, n_steps, mix="weight", lr=3e-3, warmup=2, ema=0.5, targets=None):
    hybrid = HybridConfig(boft=BOFTConfig(block_size=8, n_factors=2, impl="xla"), lora_ga=LoRAGAConfig(rank=4),
                          mix=mix)
    spec = adapters.AdapterSpec.for_method(hybrid, targets=targets)
    trainable, frozen = adapters.split_trainable(adapters.apply(spec, params, jax.random.key(1), gradients=grads))
    mixer = dict(direction="proportional", warmup_steps=warmup, ema=ema)
    if mix == "weight":
        opt = optax.chain(hybrid_weights(**mixer), optax.adamw(lr))
    else:
        opt = hybrid_weights(mix="update", inner=optax.adamw(lr), **mixer)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, frozen, opt_state):
        fz = set_lambdas(frozen, current_lambdas(opt_state))  # the optimizer's lambdas into the forward
        loss, g = jax.value_and_grad(lambda t: next_token_loss(config, adapters.combine(t, fz), batch))(trainable)
        updates, opt_state = opt.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(n_steps):
        trainable, opt_state, loss = step(trainable, frozen, opt_state)
        losses.append(float(loss))
    return losses, current_lambdas(opt_state)


@pytest.fixture(scope="module")
def tiny():
    config = M.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2)
    params = M.init_params(config, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(2), (2, 16), 0, config.vocab_size)
    return config, params, batch, estimate_gradients(config, params, [batch], n_batches=1)


@pytest.mark.parametrize("mix", ["weight", "update"])
def test_training_a_tiny_model_lowers_the_loss_and_moves_lambdas(tiny, mix):
    losses, lambdas = _train(*tiny, n_steps=6, mix=mix, lr=1e-2,
                             targets="layers/(attn/(q|v)|mlp/down)_proj")
    assert losses[-1] < losses[0] - 0.05, losses
    assert len(jax.tree.leaves(lambdas)) == 3 and lambdas["layers"]["mlp"]["down_proj"].shape == (2,)
    moved = [float(jnp.abs(lam - 0.5).max()) for lam in jax.tree.leaves(lambdas)]
    assert min(moved) > 1e-3, moved


@pytest.mark.slow
def test_training_smollm2_lowers_the_loss(smollm2_gguf):
    from hyjax.weights import load_gguf
    from hyjax.tokenization import load_tokenizer

    config, params = load_gguf(smollm2_gguf)
    tokenizer = load_tokenizer(smollm2_gguf)
    text = ("the film is a charming and often affecting journey . it is a gorgeous , witty , seductive movie . "
            "a masterpiece four years in the making . the acting , costumes , music and cinematography are superb .")
    ids = tokenizer.encode(text)[:48]
    batch = jnp.asarray([ids, ids[::-1]], jnp.int32)
    grads = estimate_gradients(config, params, [batch], n_batches=1, targets="layers/attn/(q|v)_proj")
    losses, lambdas = _train(config, params, batch, grads, n_steps=6, lr=1e-3, warmup=2, ema=0.9,
                             targets="layers/attn/(q|v)_proj")
    # Measured: 6.02, 4.85, 3.99, 3.19, 2.35, 1.87 (memorising the one batch); lambdas ~0.25-0.33.
    assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 1.0, losses
    assert all(float(jnp.abs(lam - 0.5).max()) > 1e-3 for lam in jax.tree.leaves(lambdas)), lambdas
