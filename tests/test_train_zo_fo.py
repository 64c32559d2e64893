"""The ZO + FO hybrid as a run: base weights move by SPSA and adapters by backprop in one step, the run
resumes exactly from a checkpoint, the merged export holds the trained base, and on SmolLM2-135M it
lowers the loss."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hyjax import adapters
from hyjax.weights import load_hf_checkpoint
from hyjax.config import load_config
from hyjax.training import restore, train
from test_train_run import _losses, tiny_run_overrides

ZO_FO = ["method.name=zo_fo", "method.zo_fo.learning_rate=1e-3", "method.zo_fo.directions=2", "method.lora.rank=4",
         "method.lora.dropout=0.1", "eval.num_examples=4", "eval.generation_samples=0", "eval.before_training=false",
         "checkpoint.every_steps=0", "export.merged_model=true"]


@pytest.fixture(scope="module")
def zo_fo_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("zo_fo")
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *ZO_FO))
    return output, train(config, log=lambda text: None)


def test_a_step_moves_the_base_weights_by_spsa_and_the_adapters_by_backprop(zo_fo_run, tiny_checkpoint):
    output, result = zo_fo_run
    _, pretrained = load_hf_checkpoint(tiny_checkpoint)
    base = result.state.base
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), base,
                         {key: pretrained[key] for key in base})
    assert sorted(base) == ["embed", "final_norm", "layers"]  # every weight of the (tied) model
    assert min(jax.tree.leaves(moved)) > 1e-4, moved
    assert float(np.max(np.abs(result.state.trainable["layers"]["attn"]["q_proj"]["b"]))) > 1e-3
    records = [r for r in _records(output) if "loss" in r]
    assert len(records) == 6 and all(r["zo_learning_rate"] == pytest.approx(1e-3) for r in records)
    assert all(np.isfinite(r["zo_projected_grad"]) and r["skipped"] == 0 for r in records)


def _records(output):
    import json
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_continues_exactly(zo_fo_run, tiny_checkpoint, sentiment_data, tmp_path):
    """3 steps, then the same run to 6 steps from its checkpoint: steps 4-6 and the final base weights and
    adapters equal the uninterrupted run's bitwise (the SPSA directions come from the checkpointed rng)."""
    reference_output, reference = zo_fo_run
    run = tmp_path / "run"
    train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *ZO_FO, "train.steps=3")),
          log=lambda text: None)
    resumed = train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *ZO_FO)),
                    log=lambda text: None)
    ours, theirs = _losses(run), _losses(reference_output)
    assert [ours[s] for s in (4, 5, 6)] == [theirs[s] for s in (4, 5, 6)]
    for a, b in zip(jax.tree.leaves((resumed.state.base, resumed.state.trainable)),
                    jax.tree.leaves((reference.state.base, reference.state.trainable))):
        np.testing.assert_array_equal(a, b)
    restored = restore(run)
    for a, b in zip(jax.tree.leaves(restored.adapted), jax.tree.leaves(resumed.adapted)):
        np.testing.assert_array_equal(a, b)


def test_the_merged_export_holds_the_trained_base_weights(zo_fo_run):
    output, result = zo_fo_run
    _, exported = load_hf_checkpoint(output / "export" / "merged_model")
    merged = adapters.merge(jax.device_get(result.adapted))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_zo_fo_lowers_the_loss_of_smollm2(shared_data, tmp_path):
    """SmolLM2-135M-Instruct on SST-2: 6 steps of every base weight by SPSA plus LoRA by backprop."""
    config = load_config("methods/zo_fo", [
        f"data.path={shared_data / 'sst2' / 'train.tsv'}", f"data.eval_path={shared_data / 'sst2' / 'dev.tsv'}",
        "data.max_length=48", "train.steps=6", "train.global_batch_size=8", "train.learning_rate=1e-3",
        "train.warmup_steps=1", "eval.num_examples=32", "eval.generation_samples=0", "checkpoint.every_steps=0",
        "export.merged_model=false", f"logging.output_dir={tmp_path}", "logging.every_steps=1",
        "logging.progress_bar=false"])
    result = train(config, log=lambda text: None)
    before, after = result.eval_before["eval/loss"], result.eval_after["eval/loss"]
    losses = list(_losses(tmp_path).values())
    print(f"SmolLM2 zo_fo: dev loss {before:.3f} -> {after:.3f}, accuracy {result.eval_before['eval/accuracy']:.3f} -> "
          f"{result.eval_after['eval/accuracy']:.3f}; train loss {[round(x, 3) for x in _losses(tmp_path).values()]}")
    assert after < before - 0.5, (before, after)
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    differences = [r["zo_loss_difference"] for r in _records(tmp_path) if "loss" in r]
    assert all(np.isfinite(differences)) and max(map(abs, differences)) > 0  # the perturbations changed the loss
