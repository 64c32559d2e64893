"""`python -m hyjax.train` with `train.objective: grpo` on the tiny model and generated arithmetic problems:
a run logs its rewards and GRPO metrics, evaluates exact match, draws its reward curve, and a run stopped
after step 2 and resumed equals an uninterrupted one bitwise (the sampler's keys included)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.data.arithmetic import write_arithmetic_jsonl
from hyjax.training import restore, train
from test_train_multiprocess import _two_processes


def grpo_overrides(tiny_checkpoint, data, output, *extra) -> list[str]:
    return ["model.preset=null", f"model.path={tiny_checkpoint}", f"data.path={data}", "data.task=math",
            "data.chat=false", "data.max_length=96", "data.eval_count=4", "method.name=lora",
            "train.objective=grpo", "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.learning_rate=1e-2", "train.schedule=constant", "grpo.group_size=4", "grpo.num_iterations=2",
            "grpo.max_new_tokens=8", "grpo.beta=0.1", "grpo.rewards=[[my_length_reward:length, 1.0]]",
            "checkpoint.every_steps=2", "eval.generation_samples=0", "eval.max_new_tokens=8",
            f"logging.output_dir={output}", "logging.every_steps=1", "logging.progress_bar=false",
            "export.peft_adapter=false", *extra]


@pytest.fixture
def arithmetic(tmp_path, monkeypatch):
    (tmp_path / "my_length_reward.py").write_text("def length(completion, row):\n    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_arithmetic_jsonl(tmp_path / "arith.jsonl", 40, seed=0, difficulty=1)


def _records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_grpo_run_resumes_as_if_uninterrupted(tiny_checkpoint, arithmetic, tmp_path):
    whole = tmp_path / "whole"
    result = train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, whole)), log=lambda text: None)
    records = [r for r in _records(whole) if "reward" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert {"loss", "kl", "clip_fraction", "ratio", "ratio_first_update", "reward_std", "groups_with_signal",
                "completion_tokens", "sampling_tokens_per_second", "training_tokens_per_second"} <= set(record)
        assert abs(record["ratio_first_update"] - 1) < 1e-5  # the sampler's and learner's log-probs agree
    assert records[-1]["kl"] > 0 and any(r["clip_fraction"] > 0 for r in records)
    assert "eval/exact_match" in result.eval_after and (whole / "reward_curve.png").is_file()

    part = tmp_path / "part"
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, part, "train.steps=2")),
          log=lambda text: None)
    lines = []
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, part)), log=lines.append)
    assert any(line.startswith(f"resumed from {part / 'checkpoints'}/2") for line in lines)
    resumed = {r["step"]: r for r in _records(part) if "reward" in r}
    for record in records:
        for key in ("loss", "reward", "kl", "completion_tokens"):
            assert resumed[record["step"]][key] == record[key], (record["step"], key)
    ours, theirs = (jax.tree.leaves(jax.device_get(restore(run).state.trainable)) for run in (part, whole))
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_a_grpo_run_restored_and_resumed_past_an_epoch_of_its_prompts_equals_the_uninterrupted_one(
        tiny_checkpoint, arithmetic, tmp_path):
    """6 training prompts, 2 a step: an epoch is 3 steps. A run stopped after step 2 restores (through
    `hyjax.training.restore`, which reads no data) to the uninterrupted run's step 2, and resumed to step
    5, into its second epoch, samples, rewards and trains as the uninterrupted run did."""
    few = write_arithmetic_jsonl(tmp_path / "few.jsonl", 8, seed=1, difficulty=1)
    common = [f"data.path={few}", "data.eval_count=2", "eval.before_training=false"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(load_config(None, grpo_overrides(tiny_checkpoint, few, whole, *common, "train.steps=5")),
          log=lambda text: None)
    train(load_config(None, grpo_overrides(tiny_checkpoint, few, part, *common, "train.steps=2")),
          log=lambda text: None)
    restored, reference = restore(part), restore(whole, step=2)
    assert restored.step == 2 and restored.meta["data_position"] == reference.meta["data_position"]
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(reference.state)):
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
    train(load_config(None, grpo_overrides(tiny_checkpoint, few, part, *common, "train.steps=5")),
          log=lambda text: None)
    ours, theirs = ({r["step"]: r for r in _records(run) if "reward" in r} for run in (part, whole))
    assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        for key in ("loss", "reward", "kl", "completion_tokens"):
            assert ours[step][key] == theirs[step][key], (step, key)
    for a, b in zip(jax.tree.leaves(restore(part).state.trainable), jax.tree.leaves(restore(whole).state.trainable)):
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def test_two_processes_train_as_one(tiny_checkpoint, arithmetic, tmp_path, monkeypatch):
    """Each process samples every completion from keys of (step, prompt, sample) and trains on its share
    of the rows: 2 processes draw the completions of 1 process at every step (the same rewards and
    lengths) and reach its losses and adapters up to the order of the gradient's sum. SGD keeps that
    difference at rounding size; Adam divides near-zero gradients by their own size, and a token
    sampled later could flip."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(arithmetic.parent), os.environ.get("PYTHONPATH", "")]))
    single, double = tmp_path / "single", tmp_path / "double"
    settings = ["train.steps=2", "train.optimizer=sgd", "train.b1=0.0", "train.weight_decay=0.0"]
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, single, *settings)), log=lambda text: None)
    _two_processes(grpo_overrides(tiny_checkpoint, arithmetic, double, *settings))
    ours, theirs = ({r["step"]: r for r in _records(run) if "reward" in r} for run in (double, single))
    assert sorted(ours) == sorted(theirs) == [1, 2]
    for step in ours:
        for key in ("reward", "reward_std", "completion_tokens"):
            assert ours[step][key] == theirs[step][key], (step, key)
        # the loss is a difference of terms near 1 (advantages sum to 0 in each group): an absolute bound
        np.testing.assert_allclose([ours[step]["loss"], ours[step]["kl"]], [theirs[step]["loss"], theirs[step]["kl"]],
                                   rtol=1e-5, atol=1e-6)
    assert len({r["reward"] for r in ours.values()}) > 1, "the rewards never changed: the test proves little"
    adapters = [jax.tree.leaves(jax.device_get(restore(run).state.trainable)) for run in (double, single)]
    for a, b in zip(*adapters):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_hybrid_lora_scores_its_modules_from_the_policy_gradient(tiny_checkpoint, arithmetic, tmp_path):
    """Under GRPO, Hybrid-LoRA scores every module from the policy gradient of completions the pretrained
    model samples (its paper's setting for RL post-training), not from the answer loss of the same rows;
    when no group's rewards differ that gradient is zero, and the run says so before training."""
    method = ["method.name=hybrid_lora", "method.hybrid_lora.n_batches=3", "train.steps=1",
              "eval.before_training=false"]
    rl, supervised = tmp_path / "rl", tmp_path / "supervised"
    lines = []
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, rl, *method)), log=lines.append)
    assert "hybrid_lora: sampling 3 groups of 4 completions for the start-up gradient of GRPO's objective" in lines
    assert "hybrid_lora: averaging the full policy gradient over the 3 groups whose rewards differ" in lines
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, supervised, *method, "train.objective=sft")),
          log=lambda text: None)
    scores = [{(m["path"], m["layer"]): m["score"] for m in json.loads((run / "module_selection.json").read_text())
               ["modules"]} for run in (rl, supervised)]
    assert scores[0].keys() == scores[1].keys()
    assert all(np.isfinite(value) and value > 0 for value in scores[0].values())
    assert not np.allclose([scores[0][k] for k in scores[0]], [scores[1][k] for k in scores[0]], rtol=1e-2)

    with pytest.raises(ValueError, match="the rewards of all 3 groups of 4 completions the pretrained model sampled "
                                         "at start-up agree"):
        train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, tmp_path / "flat", *method,
                                               "grpo.rewards=[[final_number, 1.0]]")), log=lambda text: None)


@pytest.mark.parametrize("method", ["full", "hybrid", "zo_fo"])
def test_the_reference_policy_is_the_model_at_step_0(method, tiny_checkpoint, arithmetic, tmp_path):
    """Full fine-tuning's reference is a copy of the whole model, the hybrid's includes its step-0
    lambdas and zo_fo's the base weights SPSA moves: the KL to it is 0 at step 1 (the policy has not
    moved) and positive once it has."""
    output = tmp_path / method
    train(load_config(None, grpo_overrides(tiny_checkpoint, arithmetic, output, f"method.name={method}",
                                           "train.steps=2", "grpo.num_iterations=1", "method.lora_ga.n_batches=2",
                                           "eval.before_training=false", "checkpoint.every_steps=0")),
          log=lambda text: None)
    records = [r for r in _records(output) if "reward" in r]
    assert abs(records[0]["kl"]) < 1e-6 and records[1]["kl"] > 1e-4, [r["kl"] for r in records]
    if method == "zo_fo":  # SPSA's estimates are of GRPO's loss, and they move the base weights
        assert all(r["zo_loss_difference"] != 0 and r["zo_learning_rate"] > 0 for r in records), records


def test_grpo_settings_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        load_config(None, ["train.objective=grpo", "data.task=math", "grpo.group_size=3"])
    with pytest.raises(ValueError, match="data.task must be math"):
        load_config(None, ["train.objective=grpo"])
    with pytest.raises(ValueError, match="reward 'no_such_reward'"):
        load_config(None, ["train.objective=grpo", "data.task=math", "grpo.rewards=[[no_such_reward, 1]]"])
