"""Hybrid-LoRA as a run: modules scored and chosen within the budget, saved with the run and shown, the
chosen modules' weights trained and every other weight changed only through LoRA, an exact resume that
keeps the checkpoint's choice, and a PEFT export (LoRA + modules_to_save) with our logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from hyjax import adapters
from hyjax import model as M
from hyjax.weights import load_hf_checkpoint
from hyjax.config import load_config
from hyjax.training import restore, train
from hyjax.training.optimizer import path_string
from test_train_run import _losses, tiny_run_overrides

HYBRID_LORA = ["method.name=hybrid_lora", "method.hybrid_lora.n_batches=2", "method.lora.rank=2",
               "eval.num_examples=4", "eval.generation_samples=0", "eval.before_training=false",
               "checkpoint.every_steps=0", "export.peft_adapter=true"]
TARGETS = 7 * 2  # projections x layers of the tiny model


@pytest.fixture(scope="module")
def hybrid_lora_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("hybrid_lora")
    lines = []
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *HYBRID_LORA))
    return output, train(config, log=lines.append), "\n".join(lines)


def test_the_choice_is_within_budget_saved_and_shown(hybrid_lora_run):
    output, result, log = hybrid_lora_run
    selection = result.setup.selection
    chosen = [m for m in selection.modules if m.chosen]
    assert len(selection.modules) == TARGETS and len(chosen) == 1  # floor(10% of 14), at least one
    assert chosen[0].score == max(m.score for m in selection.modules)
    assert json.loads((output / "module_selection.json").read_text()) == selection.to_json()
    assert restore(output).meta["module_selection"] == selection.to_json()
    assert f"1 of {TARGETS} modules trained fully" in log and chosen[0].path in log


def test_chosen_modules_train_fully_and_the_rest_only_through_lora(hybrid_lora_run, tiny_checkpoint):
    output, result, _ = hybrid_lora_run
    _, pretrained = load_hf_checkpoint(tiny_checkpoint)
    adapted = jax.device_get(result.adapted)
    merged = adapters.merge(adapted)
    for module in result.setup.selection.modules:
        node = adapted
        for key in module.path.split("/"):
            node = node[key]
        before = np.asarray(_at(pretrained, module.path))[module.layer]
        after = np.asarray(_at(merged, module.path))[module.layer]
        np.testing.assert_array_equal(node.base[module.layer], before)  # the frozen weight never moves
        if module.chosen:
            assert isinstance(node, adapters.SelectiveWeight) and np.max(np.abs(after - before)) > 1e-3
            np.testing.assert_array_equal(node.full[list(node.chosen).index(module.layer)], after)
        else:
            lora = np.asarray(node.a[module.layer]) @ np.asarray(node.b[module.layer]) * node.scale
            assert np.max(np.abs(lora)) > 1e-4
            np.testing.assert_allclose(after, before + lora, rtol=1e-5, atol=1e-6)


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_the_peft_export_with_modules_to_save_gives_our_logits(hybrid_lora_run, tiny_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    output, result, _ = hybrid_lora_run
    folder = output / "export" / "peft_adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    (chosen,) = [m for m in result.setup.selection.modules if m.chosen]
    assert len(saved["modules_to_save"]) == 1 and f".{chosen.layer}." in saved["modules_to_save"][0]
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 12))
    ours = np.asarray(M.apply(result.setup.model_config, result.adapted, tokens))
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4)


def test_a_resumed_run_keeps_the_checkpointed_modules(hybrid_lora_run, tiny_checkpoint, sentiment_data, tmp_path):
    """3 steps, then on to 6 from the checkpoint: no second scoring pass, the same modules and the
    uninterrupted run's losses and adapters, bitwise."""
    reference_output, reference, _ = hybrid_lora_run
    run = tmp_path / "run"
    train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *HYBRID_LORA, "train.steps=3")),
          log=lambda text: None)
    lines = []
    resumed = train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *HYBRID_LORA)),
                    log=lines.append)
    assert not any("averaging the full gradient" in line for line in lines)
    assert resumed.setup.selection == reference.setup.selection
    ours, theirs = _losses(run), _losses(reference_output)
    assert [ours[s] for s in (4, 5, 6)] == [theirs[s] for s in (4, 5, 6)]
    for a, b in zip(jax.tree.leaves(resumed.state.trainable), jax.tree.leaves(reference.state.trainable)):
        np.testing.assert_array_equal(a, b)


def test_a_parameter_budget_replaces_the_share_of_modules(tiny_checkpoint, sentiment_data, tmp_path):
    budget = 8192 + 4096  # one MLP module (64 x 128) and one q/o module (64 x 64) at most
    result = train(load_config(None, tiny_run_overrides(
        tiny_checkpoint, sentiment_data, tmp_path, *HYBRID_LORA, "train.steps=1", "export.peft_adapter=false",
        f"method.hybrid_lora.max_params={budget}", "method.hybrid_lora.score=grad_norm")), log=lambda text: None)
    chosen = [m for m in result.setup.selection.modules if m.chosen]
    assert 2 <= len(chosen) and sum(m.params for m in chosen) <= budget
    trained_fully = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(result.state.trainable)
                        if path_string(path).endswith(("/full", "/base")))
    assert trained_fully == sum(m.params for m in chosen)


@pytest.mark.slow
def test_smollm2_hybrid_lora_trains_and_its_peft_export_gives_our_logits(smollm2_gguf, shared_data, tmp_path):
    """The real model: modules scored from SST-2 gradients, 4 steps, exported with modules_to_save and
    loaded by PeftModel.from_pretrained on the same base weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from hyjax.weights import load_gguf, save_hf_checkpoint
    from hyjax.tokenization import load_tokenizer

    model_config, params = load_gguf(smollm2_gguf)
    base_folder = save_hf_checkpoint(tmp_path / "base", model_config, params, tokenizer=load_tokenizer(smollm2_gguf))
    del params
    config = load_config("methods/hybrid_lora", [
        f"model.path={base_folder}", f"data.path={shared_data / 'sst2' / 'train.tsv'}",
        f"data.eval_path={shared_data / 'sst2' / 'dev.tsv'}", "data.max_length=48", "train.steps=4",
        "train.global_batch_size=8", "train.learning_rate=5e-4", "method.hybrid_lora.n_batches=2",
        "eval.num_examples=32", "eval.generation_samples=0", "checkpoint.every_steps=0",
        f"logging.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"])
    result = train(config, log=lambda text: None)
    assert result.eval_after["eval/loss"] < result.eval_before["eval/loss"] - 0.5
    selection = result.setup.selection
    assert sum(m.chosen for m in selection.modules) == 21  # 10% of 30 layers x 7 projections
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16))
    ours = np.asarray(M.apply(result.setup.model_config, result.adapted, tokens))
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "run" / "export" / "peft_adapter").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    print(f"SmolLM2 hybrid_lora: dev loss {result.eval_before['eval/loss']:.3f} -> {result.eval_after['eval/loss']:.3f}, "
          f"accuracy {result.eval_before['eval/accuracy']:.3f} -> {result.eval_after['eval/accuracy']:.3f}; "
          f"PEFT export max abs logit difference {np.max(np.abs(theirs - ours)):.2e}\n{selection.table(5)}")
    assert np.max(np.abs(theirs - ours)) < 2e-3, np.max(np.abs(theirs - ours))
