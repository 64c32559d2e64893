"""`hyjax.training.train` end to end on a tiny LLaMA with the real SmolLM2 tokenizer: what a run leaves
behind, step semantics (accumulation), evaluation, export, and `hyjax.training.restore`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.training import restore, train
from hyjax.weights import load_checkpoint


def tiny_run_overrides(tiny_checkpoint, sentiment_data, output_dir, *extra) -> list[str]:
    """Overrides of a few-step run of the tiny model on the sentiment files."""
    return ["model.preset=null", f"model.path={tiny_checkpoint}", f"data.path={sentiment_data['train']}",
            f"data.eval_path={sentiment_data['dev']}", "data.chat=false", "data.max_length=32", "data.bucket=16",
            "train.steps=6", "train.global_batch_size=4", "train.learning_rate=1e-2", "train.schedule=constant",
            "checkpoint.every_steps=2", "eval.num_examples=16", "eval.generation_samples=1",
            "eval.max_new_tokens=3", f"logging.output_dir={output_dir}", "logging.every_steps=1",
            "logging.progress_bar=false", "export.peft_adapter=false", *extra]


def _losses(output_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora_run")
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, "method.name=lora",
                                                  "export.peft_adapter=true", "export.merged_model=true",
                                                  "export.gguf=q8_0", "export.gguf_lora=true",
                                                  "logging.tensorboard=true", "logging.every_steps=4"))
    return output, train(config, log=lambda text: None)


def test_a_run_leaves_metrics_checkpoints_plots_exports_and_a_summary(lora_run):
    output, result = lora_run
    losses = _losses(output)  # every step's loss; every 4th step's (and the last's) other metrics too
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "learning_rate" in r] == [4, 6]
    assert sorted(int(p.name) for p in (output / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6][-3:]
    for name in ("config.yaml", "summary.json", "loss_curve.png", "export/peft_adapter/adapter_config.json",
                 "export/merged_model/config.json", "export/model-q8_0.gguf", "export/lora_adapter.gguf"):
        assert (output / name).is_file(), name
    merged = load_checkpoint(output / "export/merged_model")[1]["layers"]["attn"]["q_proj"]
    in_gguf = load_checkpoint(output / "export/model-q8_0.gguf")[1]["layers"]["attn"]["q_proj"]
    assert np.abs(in_gguf - merged).max() <= np.abs(merged).max() / 220  # Q8_0's rounding (test_export_gguf)
    assert list((output / "tensorboard").iterdir())
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["trainable_parameters"] == result.setup.trainable_counts["total"]
    assert set(summary["eval_before"]) >= {"accuracy", "loss", "perplexity"}
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["peak_host_memory_mib"] > 0 and summary["wall_time_seconds"] > 0
    evals = [line for line in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
             if "eval_seconds" in line]
    assert [line["step"] for line in evals] == [0, 6]  # before and after training
    for line in evals:  # each scored dev row right (1) or wrong (0), in order: the accuracy's rows
        rows = line["eval_correct_rows"]
        assert len(rows) == line["eval/examples"] and set(rows) <= {"0", "1"}
        assert rows.count("1") / len(rows) == pytest.approx(line["eval/accuracy"])


def test_restore_gives_back_the_final_adapters(lora_run):
    output, result = lora_run
    restored = restore(output)
    assert restored.step == 6 and restored.config.method.name == "lora"
    for ours, theirs in zip(jax.tree.leaves(result.state.trainable), jax.tree.leaves(restored.state.trainable)):
        np.testing.assert_array_equal(ours, theirs)
    earlier = restore(output / "checkpoints", step=4)
    assert earlier.step == 4 and int(earlier.state.step) == 4


def test_gradient_accumulation_gives_the_same_step(tiny_checkpoint, sentiment_data, tmp_path):
    common = ["train.steps=2", "checkpoint.every_steps=0", "eval.before_training=false", "eval.num_examples=1",
              "method.name=lora", "train.optimizer=sgd", "train.b1=0", "train.grad_clip_norm=null"]
    whole = train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "a", *common)),
                  log=lambda text: None)
    accumulated = train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "b",
                                                             *common, "train.micro_batch_size=2")),
                        log=lambda text: None)
    np.testing.assert_allclose(list(_losses(tmp_path / "b").values()), list(_losses(tmp_path / "a").values()),
                               rtol=1e-6)
    for a, b in zip(jax.tree.leaves(whole.state.trainable), jax.tree.leaves(accumulated.state.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_math_runs_report_exact_match(tiny_checkpoint, sentiment_data, tmp_path):
    problems = tmp_path / "math.jsonl"
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} and {a} make <<{a}+{a}={2 * a}>>{2 * a}.\n#### {2 * a}"}
            for a in range(1, 13)]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "run", "method.name=lora",
                                   f"data.path={problems}", "data.eval_path=null", "data.eval_count=4",
                                   "data.task=math", "data.max_length=64", "train.steps=2")
    result = train(load_config(None, overrides), log=lambda text: None)
    after = result.eval_after
    assert after["eval/examples"] == 4
    evaluation = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if "eval_correct_rows" in line][-1]
    rows = evaluation["eval_correct_rows"]  # one 0/1 per problem: the exact match is their mean
    assert len(rows) == 4 and set(rows) <= {"0", "1"}
    assert after["eval/exact_match"] == evaluation["eval/exact_match"] == rows.count("1") / 4
    assert len(after["samples"]) == 1 and "####" in after["samples"][0]["reference"]


ALL_METHODS = ("full", "lora", "lora_ga", "oft", "boft", "unitary", "hybrid", "zo_fo", "hybrid_lora")
SEEDED_INITIALISATION = {"lora", "lora_ga", "unitary", "hybrid", "zo_fo", "hybrid_lora"}  # full, OFT, BOFT: identity


@pytest.mark.parametrize("method", ALL_METHODS)
def test_the_seed_reaches_the_data_order_the_initialisation_and_the_run_key(tiny_checkpoint, sentiment_data, tmp_path,
                                                                            method):
    """train.seed and data.shuffle_seed: another seed, other batches, another run key and, where the method
    draws its start (random LoRA factors, a start-up gradient from drawn batches), other initial values."""
    from hyjax.training import prepare_run, run_layout

    def start(seed: int):
        config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / str(seed),
                                                      f"method.name={method}", f"train.seed={seed}",
                                                      f"data.shuffle_seed={seed}", "method.lora_ga.n_batches=2",
                                                      "method.hybrid_lora.n_batches=2"))
        setup = prepare_run(config, layout=run_layout(config.mesh), log=lambda text: None)
        return next(setup.data.train)["tokens"], jax.device_get(setup.initial_state())

    (tokens_a, state_a), (tokens_b, state_b) = start(0), start(1)
    assert not np.array_equal(tokens_a, tokens_b)
    assert not np.array_equal(state_a.rng, state_b.rng)
    same_start = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state_a.trainable),
                                                           jax.tree.leaves(state_b.trainable)))
    assert same_start == (method not in SEEDED_INITIALISATION)


def test_a_hybrid_run_logs_every_layers_lambda_with_its_spread(tiny_checkpoint, sentiment_data, tmp_path):
    """metrics.jsonl keeps lambda for every projection of every layer (not one mean per projection), with
    its mean and spread over the layers; the warm-up holds 0.5, the normalized rule moves it after, and
    the last record is the optimizer state's lambda."""
    from hyjax.optim import current_lambdas
    from hyjax.adapters.targets import iter_paths

    output = tmp_path / "hybrid"
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, "method.name=hybrid",
                                                  "method.hybrid.mix=update", "method.lora_ga.n_batches=2",
                                                  "method.hybrid.lambdas.warmup_steps=2", "method.hybrid.lambdas.ema=0.0",
                                                  "eval.num_examples=4", "eval.generation_samples=0"))
    result = train(config, log=lambda text: None)
    records = [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "lambda" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    layers = result.setup.model_config.num_layers
    last = records[-1]
    assert len(last["lambda"]) == 7 and all(len(v) == layers for v in last["lambda"].values())
    for path, values in last["lambda"].items():
        assert last["lambda_mean"][path] == pytest.approx(np.mean(values), abs=1e-4)
        assert last["lambda_std"][path] == pytest.approx(np.std(values), abs=1e-4)
    assert all(v == 0.5 for v in records[0]["lambda"]["layers/attn/q_proj"])  # update 1 of a 2-update warm-up
    moved = np.concatenate([np.asarray(v) for v in last["lambda"].values()])
    assert np.abs(moved - 0.5).max() > 1e-3 and moved.std() > 0
    state = dict(iter_paths(current_lambdas(result.state.opt_state)))
    for path, values in last["lambda"].items():
        np.testing.assert_allclose(values, np.asarray(state[path]).reshape(-1), atol=1e-4)
