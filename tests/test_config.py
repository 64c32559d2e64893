"""Run configuration: YAML files + overrides -> typed, validated RunConfig, and back."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import yaml

import jax.numpy as jnp
import optax

from hyjax import adapters
from hyjax.config import (
    METHODS,
    ConfigError,
    RunConfig,
    configs_dir,
    load_config,
    parse_value,
    saved_tree,
)
from hyjax.config.methods import MethodFields
from hyjax.config.typed import build

from hyjax.methods import method_of
from hyjax.methods.plain import UnitarySection
from hyjax.optim import current_lambdas

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_YAML = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def _spec(config):
    """The adapter spec the run's method puts on the model (no start-up choice)."""
    return method_of(config).adapter_spec(config)


def test_configs_dir_is_the_package_s_link_to_the_source_tree_folder():
    assert configs_dir() == ROOT / "hyjax" / "configs" and configs_dir().resolve() == CONFIGS


def test_base_equals_the_dataclass_defaults():
    assert load_config() == RunConfig()
    assert load_config(CONFIGS / "base.yaml") == RunConfig()


def test_every_knob_in_base_yaml_is_commented():
    lines = (CONFIGS / "base.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#") or re.fullmatch(r"[a-z_]+:", line):
            continue  # blank, comment, or a top-level section header
        assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"base.yaml line {i + 1} has no comment: {line}"


def test_base_yaml_lists_every_field():
    def keys(tree, prefix=""):
        for k, v in tree.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    written = set(keys(yaml.safe_load((CONFIGS / "base.yaml").read_text())))
    assert written == set(keys(RunConfig().to_dict()))


@pytest.mark.parametrize("name", ALL_YAML)
def test_every_yaml_loads(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    _spec(config)


def test_quickstart():
    config = load_config("quickstart")
    assert config.method.name == "hybrid"
    assert config.model.preset == "smollm2-135m" and config.model.path == "smollm2-135m-instruct"
    assert config.method.boft.n_factors == 2  # from methods/hybrid.yaml
    assert config.data.path == "bundled:sst2/train.tsv" and config.data.eval_path == "bundled:sst2/dev.tsv"
    assert config.train.steps * config.train.global_batch_size <= 2000
    assert config.data.max_length == 64
    spec = _spec(config)
    ((pattern, method),) = spec.rules
    assert isinstance(method, adapters.HybridConfig)
    assert method.boft.n_factors == 2 and method.lora_ga.n_batches == 4
    assert config.train.global_batch_size == 16
    assert config.data.task_options()["answers"] == ((0, " negative"), (1, " positive"))
    hybrid = load_config("methods/hybrid")  # the quickstart keeps the hybrid's shipped settings
    assert (config.method.hybrid, config.train.learning_rate, config.train.lr_multipliers) == \
        (hybrid.method.hybrid, hybrid.train.learning_rate, hybrid.train.lr_multipliers)
    assert hybrid.method.hybrid.mix == "update" and hybrid.train.learning_rate == 5e-5
    assert hybrid.train.grad_clip_per_group and config.train.grad_clip_per_group


def test_config_named_without_suffix_or_by_path(monkeypatch, tmp_path):
    assert load_config("methods/lora") == load_config(CONFIGS / "methods" / "lora.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("train: {steps: 5}\n")
    assert load_config("mine.yaml").train.steps == 5
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_includes_merge_in_order_then_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 7, seed: 3}\nmethod: {lora: {rank: 4}}\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\ntrain: {steps: 9}\n")
    run = tmp_path / "run.yaml"
    run.write_text("defaults: [models/llama3.1-8b.yaml, b.yaml]\nmethod: {lora: {alpha: 4.0}}\n")
    config = load_config(run)
    assert config.model.preset == "llama3.1-8b" and config.model.dtype == "bfloat16"
    assert (config.train.steps, config.train.seed) == (9, 3)
    assert (config.method.lora.rank, config.method.lora.alpha) == (4, 4.0)


def test_include_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="'missing.yaml' not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: {x: 1}\n")
    with pytest.raises(ConfigError, match="include in .* must be a file name or a list"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("override, key, expected", [
    ("train.steps=250", "train.steps", 250),
    ("train.learning_rate=3e-4", "train.learning_rate", 3e-4),
    ("train.learning_rate=1", "train.learning_rate", 1.0),
    ("train.weight_decay=0.01", "train.weight_decay", 0.01),
    ("data.packing=true", "data.packing", True),
    ("checkpoint.async_save=no", "checkpoint.async_save", False),
    ("train.grad_clip_norm=null", "train.grad_clip_norm", None),
    ("model.remat=dots", "model.remat", "dots"),
    ("model.path=/ckpt/model.gguf", "model.path", "/ckpt/model.gguf"),
    ("model.path=123", "model.path", "123"),
    ("data.template=Review: {text} Sentiment:", "data.template", "Review: {text} Sentiment:"),
    ("data.chat=false", "data.chat", False),
    ("method.targets=[layers/attn/q_proj, layers/attn/v_proj]", "method.targets",
     ("layers/attn/q_proj", "layers/attn/v_proj")),
    ("method.targets=layers/attn/q_proj", "method.targets", ("layers/attn/q_proj",)),
    ("train.lr_multipliers=[[layers/.*, 2.0], [embed.*, 0]]", "train.lr_multipliers",
     (("layers/.*", 2.0), ("embed.*", 0.0))),
    ("method.hybrid.lambdas.clip=[0.1, 0.9]", "method.hybrid.lambdas.clip", (0.1, 0.9)),
    ("data.verbalizer=[[neg, ' no'], [pos, ' yes']]", "data.verbalizer", (("neg", " no"), ("pos", " yes"))),
    ("method.lora={rank: 4, dropout: 0.1}", "method.lora.rank", 4),
    ("method.lora={rank: 4, dropout: 0.1}", "method.lora.alpha", 16.0),
    ("method.lora_ga.svd_oversample=8", "method.lora_ga.svd_oversample", 8),
])
def test_override_types(override, key, expected):
    config = load_config(None, [override])
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_after_files_and_in_order():
    config = load_config("quickstart", ["train.steps=10", "train.steps=20", "method.boft.block_size=4"])
    assert config.train.steps == 20 and config.method.boft.block_size == 4
    assert config.method.lora_ga.n_batches == 4  # untouched siblings keep the file's values


def test_parse_value_follows_yaml_scalars():
    assert parse_value("1e-5") == 1e-5 and parse_value("-2E3") == -2000.0
    assert parse_value("16") == 16 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("") is None and parse_value("a:b") == "a:b"


def test_unknown_key_in_override_names_the_closest():
    with pytest.raises(ConfigError, match=re.escape(
            "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?")) as err:
        load_config(None, ["train.learnig_rate=3e-4"])
    assert "override 'train.learnig_rate=3e-4'" in str(err.value)
    with pytest.raises(ConfigError, match=re.escape("unknown key 'method.lora.rnak'; did you mean 'method.lora.rank'?")):
        load_config(None, ["method.lora.rnak=4"])
    with pytest.raises(ConfigError, match=re.escape("unknown key 'trian'; did you mean 'train'?")):
        load_config(None, ["trian.steps=4"])
    with pytest.raises(ConfigError, match="'train.steps' is a value, not a section"):
        load_config(None, ["train.steps.x=4"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match=re.escape("unknown key 'method.lora.rnak'")):
        load_config(None, ["method.lora={rnak: 4}"])


def test_unknown_key_in_file_names_the_file_and_the_closest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=re.escape(
            "unknown key 'train.micro_batch'; did you mean 'train.micro_batch_size'")) as err:
        load_config(path)
    assert str(path) in str(err.value)
    path.write_text("method:\n  boft: {blocksize: 4}\n")
    with pytest.raises(ConfigError, match=re.escape("'method.boft.blocksize'; did you mean 'method.boft.block_size'")):
        load_config(path)
    path.write_text("train:\n  steps: 4\n  steps: 5\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps must be int or null, got 'abc' (str)"),
    ("train.steps=2.5", "train.steps must be int or null, got 2.5 (float)"),
    ("data.packing=3", "data.packing must be bool, got 3 (int)"),
    ("train.learning_rate=true", "train.learning_rate must be float, got True (bool)"),
    ("train.learning_rate=fast", "train.learning_rate must be float, got 'fast' (str)"),
    ("method.lora.rank=[4]", "method.lora.rank must be int, got [4] (list)"),
    ("method.hybrid.lambdas.clip=[0.1]", "method.hybrid.lambdas.clip must have 2 items"),
    ("train.lr_multipliers=[[layers, x]]", "train.lr_multipliers[0][1] must be float, got 'x' (str)"),
    ("method.lora=3", "method.lora must be a mapping"),
])
def test_type_errors_name_key_type_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.global_batch_size=8", "train.micro_batch_size=3"],
     "train.micro_batch_size=3 must divide global_batch_size=8"),
    (["train.schedule=cosin"], "train.schedule='cosin' must be one of ['cosine', 'linear', 'constant']; "
                               "did you mean 'cosine'?"),
    (["train.optimizer=adam"], "train.optimizer='adam' must be one of"),
    (["train.epochs=2"], "train.steps=1000 and epochs=2.0: give exactly one"),
    (["train.steps=10", "train.warmup_steps=20"], "train.warmup_steps=20 must be <= steps=10"),
    (["train.learning_rate=0"], "train.learning_rate=0.0 must be > 0"),
    (["train.b2=1.0"], "train.b2=1.0 must be in [0, 1)"),
    (["train.lr_multipliers=[['(', 1.0]]"], "train.lr_multipliers[0]='(' is not a valid regular expression"),
    (["method.hybrid.lambdas.clip=[0.9, 0.1]"], "method.hybrid.lambdas.clip=[0.9, 0.1] must satisfy"),
    (["method.hybrid.lambdas.direction=inverted"], "did you mean 'inverse'?"),
    (["data.eval_fraction=1.5"], "data.eval_fraction=1.5 must be in (0, 1)"),
    (["data.task=classify"], "data.task='classify' must be one of"),
    (["data.task=math", "data.verbalizer=[[0, a]]"], "only applies to task=classification"),
    (["checkpoint.keep=0"], "checkpoint.keep=0 must be >= 1 (or null)"),
    (["model.remat=everything"], "model.remat='everything' must be one of"),
    (["model.preset=llama3-8B-typo"], "model.preset='llama3-8b-typo' must be one of"),
    (["model.preset=null", "model.path=null"], "give a preset, a checkpoint path, or both"),
    (["method.name=lorra"], "method.name='lorra' must be one of ['full', 'lora', 'lora_ga', 'oft', 'boft', "
                            "'unitary', 'hybrid', 'hybrid_lora', 'zo_fo']; did you mean 'lora'?"),
    (["method.zo_fo.adapter=lora_ga"], "method.zo_fo.adapter='lora_ga' must be one of"),
    (["method.zo_fo.mu=0"], "method.zo_fo.mu=0.0 must be > 0"),
    (["method.zo_fo.directions=0"], "method.zo_fo.directions=0 must be >= 1"),
    (["method.zo_fo.targets=[]"], "method.zo_fo: targets is empty"),
    (["method.name=zo_fo"], "export.peft_adapter=true, but method.name='zo_fo' cannot be written"),
    (["method.hybrid_lora.fraction=1.5"], "method.hybrid_lora.fraction=1.5 must be in [0, 1]"),
    (["method.hybrid_lora.score=grad"], "method.hybrid_lora.score='grad' must be one of"),
    (["method.name=hybrid_lora", "model.path=null"], "model.path is null"),
    (["method.lora.rank=0"], "method.lora: LoRA rank=0 must be at least 1"),
    (["method.boft.impl=cuda"], "method.boft: BOFT impl='cuda'"),
    (["method.unitary.impl=cuda"], "method.unitary.impl='cuda' must be one of"),
    (["method.name=oft", "method.boft.n_factors=2", "export.peft_adapter=false"],
     "name='oft' is BOFT with one butterfly factor"),
    (["method.name=hybrid"], "export.peft_adapter=true, but method.name='hybrid' cannot be written"),
    (["method.name=lora_ga", "export.peft_adapter=false", "model.path=null"], "model.path is null"),
])
def test_validation_names_field_value_and_range(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_data_section_is_the_data_pipelines_config():
    from hyjax.data import DataConfig, MathWordProblems, make_task, prepare

    assert type(RunConfig().data) is DataConfig
    with pytest.raises(ValueError, match=re.escape("data.path is not set: give the training file")):
        prepare(RunConfig().data, tokenizer=None, global_batch_size=8)
    config = load_config(None, ["data.path=gsm8k.jsonl", "data.task=math", "data.text_column=q",
                                "data.label_column=a", "data.packing=true", "train.global_batch_size=16"])
    assert (config.data.packing, config.data.task) == (True, "math")
    assert config.data.task_options() == {"question_column": "q", "answer_column": "a"}
    task = make_task(config.data)
    assert isinstance(task, MathWordProblems) and (task.question_column, task.answer_column) == ("q", "a")


def test_grad_accumulation_and_derived_values():
    config = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8"])
    assert config.train.grad_accum_steps == 4 and config.train.micro_batch == 8
    assert RunConfig().train.grad_accum_steps == 1
    assert RunConfig().checkpoint_dir == "runs/default/checkpoints"
    assert RunConfig().model.preset_config().num_layers == 30


def test_lora_spec_from_override():
    spec = _spec(load_config("methods/lora", ["method.lora.rank=16", "method.lora.rslora=true"]))
    assert spec == adapters.AdapterSpec.for_method(adapters.LoRAConfig(rank=16, alpha=16.0, rslora=True))


def test_targets_and_frozen_reach_the_spec():
    spec = _spec(load_config(None, ["method.targets=[layers/attn/(q|v)_proj]",
                                    "method.frozen=[layers/attn/v_proj]"]))
    assert spec.rules == (("layers/attn/v_proj", None), ("layers/attn/(q|v)_proj", adapters.LoRAConfig()))


@pytest.mark.parametrize("name, cls", [
    ("full", adapters.FullConfig), ("lora", adapters.LoRAConfig), ("lora_ga", adapters.LoRAGAConfig),
    ("oft", adapters.BOFTConfig), ("boft", adapters.BOFTConfig), ("unitary", adapters.UnitaryConfig),
    ("hybrid", adapters.HybridConfig), ("hybrid_lora", adapters.LoRAConfig), ("zo_fo", adapters.LoRAConfig),
])
def test_each_method_builds_its_adapter_config(name, cls):
    config = load_config(f"methods/{name}")
    ((pattern, method),) = _spec(config).rules
    assert type(method) is cls
    assert pattern == (".*" if name == "full" else adapters.targets.PROJECTIONS)


def test_hybrid_takes_its_branches_from_the_boft_and_lora_ga_sections():
    config = load_config("methods/hybrid", ["method.boft.block_size=4", "method.lora_ga.rank=2",
                                            "method.hybrid.mix=update"])
    method = config.method.adapter_config()
    assert method == adapters.HybridConfig(boft=config.method.boft, lora_ga=config.method.lora_ga, mix="update")
    assert method.boft.block_size == 4 and method.lora_ga.rank == 2


def test_zo_fo_carries_the_adapter_it_names():
    config = load_config("methods/zo_fo", ["method.zo_fo.adapter=oft", "method.boft.block_size=4"])
    assert config.method.adapter_config() == config.method.boft
    with pytest.raises(ConfigError, match="n_factors"):
        load_config("methods/zo_fo", ["method.zo_fo.adapter=oft", "method.boft.n_factors=2"])


def test_gradient_batches_follow_the_method():
    for name, overrides, expected in (("lora_ga", [], (64, 2)),
                                      ("hybrid_lora", ["method.hybrid_lora.n_batches=3"], (3, 2))):
        config = load_config(f"methods/{name}", overrides)
        assert method_of(config).gradient_batches(config.method) == expected


@pytest.mark.parametrize("mix, parts", [("weight", 2), ("update", 1)])
def test_the_hybrid_puts_its_transform_around_the_base_optimizers(mix, parts):
    config = load_config("quickstart", [f"method.hybrid.mix={mix}"])
    chain = method_of(config).optimizer(config, optax.sgd(1e-3), config.train.steps)
    assert len(chain) == parts  # mix=update: hybrid_weights(inner=...) holds the base optimizers
    hybrid = {"boft_r": jnp.zeros((1, 2, 2 * 2)), "boft_s": jnp.ones(4), "lora_a": jnp.zeros((4, 1)),
              "lora_b": jnp.zeros((1, 4))}
    state = optax.chain(*chain).init({"q_proj": hybrid})
    assert float(current_lambdas(state)["q_proj"]) == 0.5


def test_unitary_section_mirrors_unitary_config():
    mine = {f.name: f.default for f in dataclasses.fields(UnitarySection)}
    theirs = {f.name: f.default for f in dataclasses.fields(adapters.UnitaryConfig)}
    assert mine == theirs


def test_methods_exist_in_adapters_and_have_a_yaml():
    assert set(METHODS) == {"full", "lora", "lora_ga", "oft", "boft", "unitary", "hybrid", "hybrid_lora", "zo_fo"}
    for name in METHODS:
        assert (CONFIGS / "methods" / f"{name}.yaml").is_file()


def test_choices_come_from_the_modules_they_configure():
    from hyjax import data
    from hyjax.methods import hybrid
    import importlib
    hw = importlib.import_module("hyjax.optim.hybrid_weights")

    assert hybrid.DIRECTIONS is hw.DIRECTIONS
    with pytest.raises(ConfigError, match=re.escape(f"data.task='gsm8' must be one of {list(data.TASKS)}; "
                                                    "did you mean 'gsm8k'?")):
        load_config(None, ["data.task=gsm8"])
    with pytest.raises(ConfigError, match=re.escape(f"data.format='tab' must be one of {list(data.FORMATS)}")):
        load_config(None, ["data.format=tab"])
    with pytest.raises(ConfigError, match=re.escape(f"must be one of {list(hw.DIRECTIONS)}")):
        load_config(None, ["method.hybrid.lambdas.direction=both"])


def test_model_path_names_a_known_pretrained_checkpoint():
    from hyjax import pretrained

    assert RunConfig().model.path == pretrained.SMOLLM2_135M_INSTRUCT == "smollm2-135m-instruct"
    assert RunConfig().model.pretrained
    assert not load_config(None, ["model.path=model.gguf"]).model.pretrained


@pytest.mark.parametrize("name", ["quickstart", "methods/hybrid", "models/llama3.1-405b"])
def test_save_and_load_round_trip(tmp_path, name):
    config = load_config(name, ["data.verbalizer=[[0, ' bad'], [1, ' good']]", "train.lr_multipliers=[[x.*, 0.5]]",
                                "train.learning_rate=3e-5", "method.targets=[layers/attn/q_proj]"])
    path = config.save(tmp_path / "run" / "config.yaml")
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == config.to_dict()


def test_configs_dir_from_environment(monkeypatch, tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "x.yaml").write_text("train: {seed: 5}\n")
    monkeypatch.setenv("HYJAX_CONFIGS", str(tmp_path))
    assert configs_dir() == tmp_path
    config = load_config("x")
    assert (config.train.steps, config.train.seed) == (3, 5)
    monkeypatch.setenv("HYJAX_CONFIGS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="HYJAX_CONFIGS"):
        load_config()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_model_applies_the_spec_to_abstract_params(name):
    config = load_config(f"methods/{name}")
    counts = adapters.count_trainable(config.check_model())
    assert counts["total"] > 0


def test_check_model_reports_what_does_not_fit():
    with pytest.raises(ConfigError, match=re.escape("method.name='oft' does not fit model.preset='smollm2-135m': "
                                                    "BOFT block_size=7 must divide the weight's d_in=576")):
        load_config("methods/oft", ["method.boft.block_size=7"]).check_model()
    with pytest.raises(ConfigError, match="targets \\['nothing'\\] match no parameter"):
        load_config(None, ["method.targets=[nothing]"]).check_model()
    with pytest.raises(ConfigError, match="pass the checkpoint's LlamaConfig"):
        load_config(None, ["model.preset=null"]).check_model()


def test_a_moved_section_is_refused_by_its_new_name(tmp_path):
    """`train.hybrid_weights` is now `method.hybrid.lambdas`: a config naming the old place, in a file or an
    override, is refused with the new one."""
    with pytest.raises(ConfigError, match=re.escape("'train.hybrid_weights.ema' has moved to "
                                                    "'method.hybrid.lambdas.ema'")):
        load_config("methods/hybrid", ["train.hybrid_weights.ema=0.5"])
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  hybrid_weights:\n    clip: [0.5, 0.5]\n")
    with pytest.raises(ConfigError, match=re.escape(f"'train.hybrid_weights' has moved to 'method.hybrid.lambdas' "
                                                    f"(in {path})")):
        load_config(path)


def test_a_saved_config_is_read_with_its_moved_section_in_its_new_place():
    config = load_config("methods/hybrid", ["method.hybrid.lambdas.ema=0.5"])
    tree = config.to_dict()
    tree["train"]["hybrid_weights"] = tree["method"]["hybrid"].pop("lambdas")  # as runs saved it before the move
    assert build(RunConfig, saved_tree(tree)) == config
    assert "hybrid_weights" in tree["train"]  # the saved tree itself is left as it was


def test_the_method_section_holds_each_methods_own_sub_sections():
    """Every sub-section of `method` is the dataclass a registered method brings (`Method.section_types`),
    and every such dataclass is there."""
    section = RunConfig().method
    brought = {name: tp for method in METHODS.values() for name, tp in method.section_types.items()}
    shared = {f.name for f in dataclasses.fields(MethodFields)}
    assert {f.name for f in dataclasses.fields(section)} - shared == set(brought)
    for name, tp in brought.items():
        assert type(getattr(section, name)) is tp, name
