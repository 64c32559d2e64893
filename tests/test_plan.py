"""`python -m hyjax.plan`: the training step compiled for TPU topologies on this CPU machine (libtpu),
checked against the committed golden plans (bench/results/plans.json), and its refusals."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from hyjax.config import load_config
from hyjax.cli.plan import main
from hyjax.planning.planner import PlanError, parse_topology, plan
from hyjax.sharding import ShardingError

PROJECT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = json.loads((PROJECT / "bench" / "results" / "plans.json").read_text())["rows"]
sys.path.insert(0, str(PROJECT / "bench"))
from plans import CI_ROW, SHIPPED, row_config  # noqa: E402


def _golden(model: str, method: str, topology: str) -> dict:
    return next(r for r in GOLDEN if (r["model"], r["method"], r["topology"]) == (model, method, topology))


def _matches_golden(result, golden: dict) -> None:
    """Per-chip memory within 3% of the golden plan, and the largest arrays split the same way."""
    for key in ("arguments", "total"):
        assert result.memory_gib[key] == pytest.approx(golden["memory_gib"][key], rel=0.03), key
    assert result.fits == golden["fits"]
    assert [(a["path"], a["spec"]) for a in result.largest_arrays] == [
        (a["path"], a["spec"]) for a in golden["largest_arrays"]]
    assert result.trainable_parameters == golden["trainable_parameters"]


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu")


def test_small_plan_compiles_for_v5p_2x2x1_as_recorded(libtpu):
    name, model_yaml, topology, method, overrides = CI_ROW
    result = plan(row_config(model_yaml, method, overrides), topology)
    assert result.chips == 4 and result.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert result.fits and 0 < result.memory_gib["total"] < 4
    embed = next(a for a in result.largest_arrays if a["path"] == "frozen/embed")
    assert embed["spec"] == "('tensor', 'fsdp')" and embed["shard_gib"] == pytest.approx(embed["global_gib"] / 4)
    _matches_golden(result, _golden(name, method, topology))


@pytest.mark.slow
def test_shipped_405b_hybrid_fits_v5p_8x8x8(libtpu):
    config_name, topology = SHIPPED
    result = plan(load_config(config_name), topology)
    assert result.chips == 512 and result.fits
    assert result.memory_gib["total"] < result.hbm_gib
    _matches_golden(result, _golden(f"configs/{config_name}.yaml", "hybrid", topology))


@pytest.mark.parametrize("name", ["v9:2x2", "v5p-8x8x8", "v5p:8", "tpu"])
def test_unknown_topology_names_are_refused(name):
    with pytest.raises(PlanError, match="unknown TPU topology"):
        parse_topology(name)


def test_topology_libtpu_cannot_build_is_refused(libtpu):
    with pytest.raises(PlanError, match="libtpu cannot describe TPU topology 'v5p:3x5x7'"):
        plan(load_config("quickstart"), "v5p:3x5x7")


def test_mesh_that_does_not_divide_the_model_names_the_dimension(libtpu):
    config = row_config("models/llama3.1-8b.yaml", "lora", ["model.path=/checkpoint", "mesh.data=1", "mesh.fsdp=1",
                                                            "mesh.tensor=512", "train.global_batch_size=8"])
    with pytest.raises(ShardingError, match=r"model\['embed'\] has shape \(128256, 4096\): dimension 0 \(vocab, size "
                                            r"128256\) does not divide by mesh axes tensor 512"):
        plan(config, "v5p:8x8x8")


def test_cli_refuses_bad_topology_before_loading_anything(capsys):
    assert main(["quickstart", "--topology", "v5p"]) == 2
    assert "unknown TPU topology 'v5p'" in capsys.readouterr().err


def test_multi_slice_mesh_spans_slices_with_the_data_axis(libtpu):
    from jax.experimental import topologies

    from hyjax.sharding import build_mesh

    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu", num_slices=2).devices
    mesh = build_mesh(data=-1, fsdp=4, slices=2, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for index in range(2):  # each data index is one slice; fsdp stays on a slice's fast interconnect
        assert {d.slice_index for d in mesh.devices[index].flat} == {index}
    with pytest.raises(ShardingError, match="mesh.slices=4, but the devices come from 2 slice"):
        build_mesh(data=-1, fsdp=2, slices=4, devices=devices)


def test_a_grpo_plan_counts_its_sampling_beside_its_own_update(libtpu):
    """A GRPO run's plan compiles GRPO's update and its sampler: the sampler's KV cache for every
    completion (prompt + new tokens) is counted, and the total holds the larger of the two stages."""
    import jax.numpy as jnp

    _, model_yaml, topology, _, row = CI_ROW
    config = row_config(model_yaml, "lora", [*row, "train.objective=grpo", "data.task=math", "grpo.group_size=4",
                                             "grpo.max_new_tokens=64"])
    result = plan(config, topology)
    model = config.model.preset_config()
    completions, slots = 8, 256  # global batch 8; a prompt of 256 - 64 tokens and 64 new ones
    cache = 2 * model.num_layers * completions * slots * model.num_kv_heads * model.head_dim * jnp.dtype(
        model.jnp_dtype).itemsize
    m, gib = result.memory_gib, 1024.0 ** 3
    assert m["sampling"] * gib >= cache / result.chips  # at least each chip's share of the KV cache
    update = m["temporaries"] + m["outputs"] - m["aliased"]
    assert m["total"] == pytest.approx(m["arguments"] + max(update, m["sampling"]) + m["reference"])
    assert m["reference"] > 0 and "GRPO's sampling" in result.report()


@pytest.mark.parametrize("method", ["full", "lora", "zo_fo"])
def test_grpo_reference_policy_is_counted_per_chip(method):
    """GRPO keeps what a run trains, at step 0, as its reference policy: the plan adds one copy of it per
    chip (the whole model for full fine-tuning, the adapters for LoRA, the adapters and the base weights
    SPSA trains for zo_fo), and nothing with beta 0 or the supervised objective."""
    import jax
    import jax.numpy as jnp

    from hyjax.planning.planner import reference_policy_bytes
    from hyjax.training.run_plan import plan_run, run_layout

    grpo = ["train.objective=grpo", "data.task=math", "grpo.beta=0.04", "model.path=/checkpoint"]
    for overrides, copies in ((grpo, 1), ([*grpo, "grpo.beta=0"], 0), (["model.path=/checkpoint"], 0)):
        config = row_config("models/smollm2-135m.yaml", method, overrides)
        run = plan_run(config, config.model.preset_config(), run_layout(config.mesh), total_steps=10)
        state = run.abstract_arguments()[0]
        itemsize = jnp.dtype(config.model.param_dtype).itemsize
        trained = run.trainable_counts["total"] + sum(leaf.size for leaf in jax.tree.leaves(state.base))
        assert reference_policy_bytes(config, (state.trainable, state.base),
                                      (run.shardings.state.trainable, run.shardings.state.base)) == (
            copies * trained * itemsize), overrides



def _abstract_plan(config, selection=None):
    from hyjax.training.run_plan import plan_run, run_layout

    return plan_run(config, config.model.preset_config(), run_layout(config.mesh), total_steps=10,
                    selection=selection)


def test_hybrid_lora_is_planned_at_its_largest_modules():
    """Without gradients the plan trains fully the budget's count of modules, the largest first: on
    LLaMA 3.1 8B (7 projections x 32 layers; 10% -> 22 modules) the 22 largest are MLP projections of
    4096 x 14336, never k_proj's 4096 x 1024 (grouped-query attention)."""
    config = row_config("models/llama3.1-8b.yaml", "hybrid_lora", ["model.path=/checkpoint"])
    run = _abstract_plan(config)
    chosen = [m for m in run.selection.modules if m.chosen]
    assert len(chosen) == 22 and {m.params for m in chosen} == {4096 * 14336}
    assert all(m.path.startswith("layers/mlp/") for m in chosen)
    assert min(m.params for m in chosen) >= max(m.params for m in run.selection.modules if not m.chosen)
    full = run.trainable_counts["total"] - _abstract_plan(row_config(
        "models/llama3.1-8b.yaml", "hybrid_lora", ["model.path=/checkpoint", "method.hybrid_lora.fraction=0"])
    ).trainable_counts["total"]
    assert full == 22 * 4096 * 14336  # each chosen module's weight (LoRA's factors stay stacked for every layer)


def test_hybrid_lora_is_planned_with_a_runs_saved_choice(tmp_path, capsys):
    """`--selection` plans the modules a run chose (its module_selection.json), here 3 k_proj layers."""
    config = row_config("models/llama3.1-8b.yaml", "hybrid_lora", ["model.path=/checkpoint"])
    worst = _abstract_plan(config).selection
    saved = worst.to_json()
    for module in saved["modules"]:
        module["chosen"] = module["path"] == "layers/attn/k_proj" and module["layer"] < 3
    run = _abstract_plan(config, worst.from_json(saved))
    assert run.trainable_counts["total"] - _abstract_plan(config).trainable_counts["total"] == (
        3 * 4096 * 1024 - 22 * 4096 * 14336)
    (tmp_path / "bad.json").write_text("{\"score\": 1}")
    assert main(["quickstart", "--topology", "v5p:2x2x1", "--selection", str(tmp_path / "bad.json")]) == 2
    assert "bad.json has no 'modules': give a run's module_selection.json" in capsys.readouterr().err
    with pytest.raises(PlanError, match="method 'lora' makes no start-up choice"):
        plan(row_config("models/smollm2-135m.yaml", "lora", ["model.path=/checkpoint"]), "v5p:2x2x1",
             selection=saved)
