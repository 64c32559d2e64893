"""`python -m hyjax.eval`: a run folder, its merged Hugging Face and GGUF exports, and the base model plus
its PEFT adapter all score what the run's own final evaluation scored, on the same held-out rows."""

from __future__ import annotations

import json

import pytest

from hyjax.cli.eval import main
from hyjax.config import load_config
from hyjax.data import extract_final_answer
from hyjax.training import train
from hyjax.evaluation.held_out import generation_cost

from test_train_run import tiny_run_overrides


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval_run")
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, "method.name=lora",
                                                  "eval.generation_samples=0", "eval.before_training=false",
                                                  "export.peft_adapter=true", "export.merged_model=true",
                                                  "export.gguf=f32"))
    train(config, log=lambda text: None)
    return output, json.loads((output / "summary.json").read_text())["eval_after"]


def _evaluate(capsys, *argv):
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out[out.index("\n{") + 1:]), out


def test_a_run_folder_scores_what_its_final_evaluation_scored(finished_run, capsys):
    output, final = finished_run
    result, printed = _evaluate(capsys, output, "--json", "-")
    assert result["examples"] == final["examples"] == 16 and result["task"] == "classification"
    assert result["metrics"]["accuracy"] == final["accuracy"]
    assert result["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert len(result["correct_rows"]) == 16
    assert printed.splitlines()[0].startswith("model") and "(step 6, lora)" in printed
    assert f"accuracy    {final['accuracy']:.4f}" in printed


def test_evaluation_scores_the_merged_model(finished_run, capsys, monkeypatch):
    # adapters applied at every forward pass cost up to 1.4x the merged model's time (bench/evaluation_speed.py)
    import jax

    from hyjax import adapters
    from hyjax.evaluation import held_out as evaluation

    scored_trees = []

    def recording(model_config, params, *args, **kwargs):
        scored_trees.append(params)
        return scorer(model_config, params, *args, **kwargs)

    scorer = evaluation.candidate_log_likelihoods
    monkeypatch.setattr(evaluation, "candidate_log_likelihoods", recording)
    _evaluate(capsys, finished_run[0], "--json", "-")
    adapted = [leaf for tree in scored_trees
               for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, adapters.AdaptedWeight))
               if isinstance(leaf, adapters.AdaptedWeight)]
    assert scored_trees and not adapted


@pytest.mark.parametrize("export", ["merged_model", "model-f32.gguf", "peft_adapter"])
def test_each_export_scores_as_the_run_did(finished_run, tiny_checkpoint, sentiment_data, capsys, export):
    output, final = finished_run
    settings = ["data.chat=false", "data.max_length=32", "data.bucket=16", "eval.num_examples=16",
                "eval.generation_samples=0", "--data", sentiment_data["dev"], "--json", "-"]
    if export == "peft_adapter":
        result, _ = _evaluate(capsys, tiny_checkpoint, "--adapter", output / "export" / export, *settings)
    else:
        result, _ = _evaluate(capsys, output / "export" / export, *settings)
    assert result["correct_rows"] == _evaluate(capsys, output, "--json", "-")[0]["correct_rows"]
    assert result["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_math_is_scored_by_exact_match_and_answer_loss(tiny_checkpoint, tmp_path, capsys):
    problems = tmp_path / "math.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"#### {2 * a}"}) + "\n"
                                for a in range(1, 6)))
    result, printed = _evaluate(capsys, tiny_checkpoint, "data.task=math", "data.chat=false", "eval.max_new_tokens=3",
                                "eval.generation_samples=5", "--data", problems, "--json", "-")
    assert result["examples"] == 5 and set(result["metrics"]) == {"exact_match", "answer_format", "loss", "perplexity",
                                                                  "generated_tokens", "decode_steps"}
    assert result["metrics"]["exact_match"] == 0.0 and result["metrics"]["loss"] > 0
    assert 0 < result["metrics"]["generated_tokens"] <= 3 and 1 <= result["metrics"]["decode_steps"] <= 3 * 5
    answered = [extract_final_answer(sample["generated"]) is not None for sample in result["samples"]]
    assert len(answered) == 5  # every problem's generation shown: answer_format is the share with a final number
    assert result["metrics"]["answer_format"] == pytest.approx(sum(answered) / 5) and "answer_format" in printed
    assert result["correct_rows"] == "00000" and "exact_match" in printed


def test_generation_cost_counts_each_batch_until_its_longest_answer_stops():
    # batch 1: the 5-token answer stops at step 6 (its stop token), the cap is 6; batch 2: 3 tokens + stop
    cost = generation_cost([[2, 5], [3]], max_new_tokens=6)
    assert cost == {"eval/generated_tokens": pytest.approx(10 / 3), "eval/decode_steps": 6 + 4}
    assert generation_cost([[6, 1]], max_new_tokens=6)["eval/decode_steps"] == 6  # ran to the cap


def test_bad_requests_get_one_line_before_any_model_loads(finished_run, tiny_checkpoint, capsys):
    output, _ = finished_run
    cases = [([tiny_checkpoint], "nothing to evaluate on: give --data FILE"),
             ([output, "--adapter", output], "--adapter applies to a base model"),
             ([tiny_checkpoint, "--step", "3", "--data", "x.tsv"], "--step applies to run folders only"),
             ([output, "--data", "missing.tsv"], "missing.tsv does not exist")]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
