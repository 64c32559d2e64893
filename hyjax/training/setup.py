"""Everything a run needs before its first step, on top of its `RunPlan`: checks that need no model,
then the model's weights and tokenizer, the data, the method's start-up gradient estimate and choice,
and the adapted tree on the devices.

`preflight` runs first and only reads the config and the file system, so a missing data file or an
unwritable output folder is reported before any download or compile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import uuid
from typing import Any, Callable

import jax

from hyjax import adapters, bundled, pretrained
from hyjax.config import ConfigError, RunConfig
from hyjax.data import BatchIterator, PreparedData, Rows, check_held_out, evaluation_set, prepare
from hyjax.methods import METHODS, method_of
from hyjax.model import init_params
from hyjax.model.config import LlamaConfig
from hyjax.rl.startup import policy_gradient_sources
from hyjax.sharding import Layout, put_local
from hyjax.hub import parse_dataset, parse_model, resolve_model
from hyjax.tokenization import Tokenizer, load_tokenizer
from hyjax.tokenization.gguf_vocab import GGUFTokenizerError, tokenizer_fields
from hyjax.training.run_plan import RunPlan, base_shardings, check_batch_split, plan_run
from hyjax.training.step import AnswerLoss, TrainState
from hyjax.weights import load_checkpoint_sharded


def preflight(config: RunConfig) -> None:
    """Raises `ConfigError` naming the key to fix when a data file is missing or the output folder
    cannot be written. Touches nothing but a probe file in the output folder."""
    for key in ("path", "eval_path"):
        value = getattr(config.data, key)
        if key == "path" and value is None:
            raise ConfigError("data.path is not set: give the training file, e.g. data.path=train.tsv "
                              "(tsv, csv, jsonl, parquet, or a save_to_disk folder)")
        try:
            named = value is not None and (parse_dataset(value) is not None or bundled.resolve(value) is not None)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data.{key}: {err}") from err
        if value is not None and not named and not pathlib.Path(value).exists():
            raise ConfigError(f"data.{key}={value!r} does not exist (relative paths are read from the working "
                              f"directory {os.getcwd()}; a Hugging Face Hub data set is written hf:org/name)")
    if config.model.tokenizer is not None and not pathlib.Path(config.model.tokenizer).exists():
        raise ConfigError(f"model.tokenizer={config.model.tokenizer!r} does not exist")
    if config.model.path is not None and not config.model.pretrained:
        try:
            hub_model = parse_model(config.model.path)
        except ValueError as err:
            raise ConfigError(f"model.path: {err}") from err
        if hub_model is None and not pathlib.Path(config.model.path).exists():
            raise ConfigError(f"model.path={config.model.path!r} does not exist: give a .gguf file, a Hugging Face "
                              f"folder, a Hub name (org/name), or one of {sorted(pretrained.KNOWN)}")
    for key, folder in (("logging.output_dir", config.logging.output_dir), ("checkpoint.dir", config.checkpoint_dir)):
        _check_writable(key, pathlib.Path(folder))


def _check_writable(key: str, folder: pathlib.Path) -> None:
    probe = folder / f".write-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={str(folder)!r} is not writable ({err.strerror or err}); choose another "
                          f"folder with {key}=PATH") from err


def fingerprint(config: RunConfig) -> dict:
    """What makes checkpoints of two runs interchangeable: the model, the method section less the
    sub-sections its method does not read (`Method.sections`) and, for a method whose forward pass changed
    form (`Method.form`), that form."""
    model = config.model
    method = method_of(config)
    section = {key: value for key, value in config.to_dict()["method"].items()
               if not isinstance(value, dict) or key in method.sections}
    prints = {"model": {"preset": model.preset, "path": model.path, "family": model.family}, "method": section}
    form = method.form(config.method)
    return prints if form is None else {**prints, "form": form}


def comparable_fingerprint(fingerprint: dict) -> dict:
    """A fingerprint as two are compared: its method section less the sub-sections its method does not
    read (runs saved before kept them all) and less every setting at today's default, so that an option
    added since (at its default) or one of another method leaves a saved run resumable."""
    section = fingerprint.get("method")
    if not isinstance(section, dict) or section.get("name") not in METHODS:
        return fingerprint
    defaults = RunConfig().to_dict()["method"]
    reads = METHODS[section["name"]].sections
    kept = {}
    for key, value in section.items():
        if isinstance(value, dict):
            if key in reads:
                kept[key] = {k: v for k, v in value.items() if defaults.get(key, {}).get(k, object()) != v}
        elif key == "name" or defaults.get(key, object()) != value:
            kept[key] = value
    return {**fingerprint, "method": kept}


@dataclasses.dataclass
class RunSetup:
    """A run, ready to train: its plan, the model's tokenizer, the initial trainable / frozen /
    method's own weights on the devices, and the data."""

    plan: RunPlan
    model_path: pathlib.Path | None  # the checkpoint read (None: random weights)
    tokenizer: Tokenizer
    trainable: Any  # initial trainable parameters (None once `train` has built its state from them)
    frozen: dict  # everything else of the adapted tree (less `base`)
    base: dict | None  # the method's own weights (Method.own_weights: zo_fo's; None otherwise, and once in a state)
    data: PreparedData | None  # None for a run restored from its checkpoint alone (`setup_from_checkpoint`)
    eval_rows: Rows | None  # held-out rows, at most eval.num_examples (None: no evaluation)
    eval_task: Any  # the task format resolved against the held-out rows' columns
    rows: tuple[int, int]  # (index, count) of this process's part of each batch

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    @property
    def model_config(self) -> LlamaConfig:
        return self.plan.model_config

    @property
    def selection(self) -> Any:
        """The method's start-up choice (Hybrid-LoRA's modules), or None."""
        return self.plan.selection

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def trainable_counts(self) -> dict[str, int]:
        return self.plan.trainable_counts

    @property
    def start(self) -> dict:
        """The adapters' starting values (`adapters.starting_values`), which every checkpoint keeps."""
        return adapters.starting_values(self.frozen)

    def initial_state(self) -> TrainState:
        """The fresh state, laid out on the run's devices."""
        return self.plan.create_state(self.trainable, self.base)


def load_model(config: RunConfig, layout):
    """`(model_config, params, tokenizer, checkpoint path)` of `config.model`, the weights placed on
    `layout`'s devices as they are read: each process reads only the slices its devices hold."""
    section = config.model
    path = None
    if section.path is None:
        model_config = section.preset_config()
        params = jax.jit(init_params, static_argnums=0, out_shardings=base_shardings(layout, model_config))(
            model_config, jax.random.key(config.train.seed))
    else:
        path = resolve_model(section.path)
        model_config, params = load_checkpoint_sharded(path, lambda found: base_shardings(layout, found),
                                                        **section.computation)
        expected = section.preset_config()
        if expected is not None and _architecture(expected) != _architecture(model_config):
            raise ConfigError(f"model.path={section.path!r} is not a {section.preset!r} model: "
                              f"{_architecture_difference(expected, model_config)}; set model.preset to null "
                              "(read the architecture from the checkpoint) or to the right preset")
    tokenizer_path = section.tokenizer or path
    if tokenizer_path is None:
        raise ConfigError("model.path=null (random weights) carries no tokenizer: set model.tokenizer to a "
                          "tokenizer file or folder")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                          f"of {model_config.vocab_size}")
    if config.export.gguf is not None:  # refused now rather than after training
        try:
            tokenizer_fields(tokenizer, model_config.vocab_size)
        except GGUFTokenizerError as err:
            raise ConfigError(f"export.gguf={config.export.gguf!r}: {err}; set export.gguf=null "
                              "(export.merged_model=true writes a Hugging Face folder)") from err
    return model_config, params, tokenizer, path


_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "tie_embeddings")


def _architecture(model_config) -> tuple:
    return tuple(getattr(model_config, name) for name in _ARCHITECTURE)


def _architecture_difference(expected, found) -> str:
    return ", ".join(f"{name} {getattr(found, name)} (preset {getattr(expected, name)})"
                     for name in _ARCHITECTURE if getattr(expected, name) != getattr(found, name))


def total_steps(config: RunConfig, batches: BatchIterator) -> int:
    """`train.steps`, or `train.epochs` passes over the data in steps."""
    if config.train.steps is not None:
        return config.train.steps
    return max(1, math.ceil(config.train.epochs * batches.steps_per_epoch(0)))


def _gradient_batches(config: RunConfig, data: PreparedData, layout: Layout, n_batches: int, batch_size: int):
    """The batches the start-up gradient is averaged over (n batches of `batch_size` training
    examples), in an order of their own (the same on every process), split over the mesh like training
    batches when their rows divide (else every device computes all rows)."""
    batches = BatchIterator(data.train.examples, global_batch_size=batch_size,
                            max_length=data.train.max_length, pad_id=data.train.pad_id,
                            seed=config.data.shuffle_seed + 1, bucket=data.train.bucket, process_index=0,
                            process_count=1)
    split = batch_size % layout.ways("batch") == 0
    rows = layout.sharding(("batch", "seq"))
    for _ in range(n_batches):
        batch = next(batches)
        yield {key: put_local(value, rows) for key, value in batch.items()} if split else batch


def _startup_gradients(config: RunConfig, model_config: LlamaConfig, params: dict, data: PreparedData, layout: Layout,
                       tokenizer: Tokenizer, log: Callable[[str], None]) -> dict:
    """The method's start-up estimate of each target's full gradient (`adapters.estimate_gradients`) of the
    run's objective: the answer loss over `n_batches` batches of `batch_size` training examples, or for
    GRPO the policy gradient of `n_batches` groups of completions the pretrained model samples
    (`hyjax.rl.startup`)."""
    method = method_of(config)
    n_batches, batch_size = method.gradient_batches(config.method)
    targets = method.adapter_spec(config, model_config)
    if config.train.objective == "grpo":
        log(f"{method.name}: sampling {n_batches} groups of {config.grpo.group_size} completions for the start-up "
            "gradient of GRPO's objective")
        batches, loss_fn, taught = policy_gradient_sources(config, model_config, params, tokenizer, n_batches)
        log(f"{method.name}: averaging the full policy gradient over the {taught} groups whose rewards differ")
        return adapters.estimate_gradients(model_config, params, batches, targets=targets, loss_fn=loss_fn,
                                           n_batches=taught)
    log(f"{method.name}: averaging the full gradient over {n_batches} batches of {batch_size}")
    return adapters.estimate_gradients(
        model_config, params, _gradient_batches(config, data, layout, n_batches, batch_size),
        targets=targets, loss_fn=AnswerLoss(model_config), n_batches=n_batches)


def prepare_run(config: RunConfig, *, layout: Layout, data_position: dict | None = None,
                selection: Any = None, read_start: Callable[[dict], dict | None] | None = None,
                log: Callable[[str], None] = print) -> RunSetup:
    """Loads the model and data, runs the method's start-up gradient estimate and choice, plans the run
    and builds its adapted tree on `layout` (a `hyjax.sharding.Layout`; every process calls this
    identically). For a restored run: `selection`, the method's start-up choice as its checkpoint
    recorded it (JSON), used instead of choosing again; `read_start`, which reads the adapters' starting
    values from the checkpoint into `plan.abstract_start()` (None when it has none), used instead of
    drawing them again from a new gradient estimate."""
    rows, (model_config, params, tokenizer, path) = _rows_and_model(config, layout)
    if config.train.objective == "grpo":  # a step takes global_batch_size / group_size prompts, every process all
        prompts = config.train.global_batch_size // config.grpo.group_size
        # GRPO's saved position counts its prompts (hyjax.rl.prompts resumes from it), not these batches
        data = prepare(config.data, tokenizer, global_batch_size=prompts, process_index=0, process_count=1)
    else:
        data = prepare(config.data, tokenizer, global_batch_size=config.train.global_batch_size,
                       process_index=rows[0], process_count=rows[1], position=data_position)
    if data.train.steps_per_epoch(0) == 0:
        raise ConfigError(f"{len(data.train.examples)} training examples make no full batch of "
                          f"{data.train.global_batch_size} (train.global_batch_size="
                          f"{config.train.global_batch_size}); lower it or add data")
    log(f"data: {data.report.summary()}")
    eval_rows, eval_task = evaluation_set(config.data, data.eval_rows, config.eval.num_examples) or (None, None)
    if eval_rows is not None:
        check_held_out(eval_rows, eval_task, tokenizer, config.data)
    method = method_of(config)
    if selection is not None:
        selection = method.selection_from_json(selection)
    gradients = None
    if method.from_gradients(config.method) and selection is None and read_start is None:
        gradients = _startup_gradients(config, model_config, params, data, layout, tokenizer, log)
        selection = method.select(config, gradients)
    if selection is not None:
        log(selection.table())
    plan = plan_run(config, model_config, layout, total_steps(config, data.train), selection)
    if read_start is not None and plan.abstract_start():
        gradients = read_start(plan.abstract_start())
        if gradients is None:
            log(f"{method.name}: the checkpoint keeps no starting values (saved by an earlier version): drawn "
                "again from the start-up gradient, which gives the saved model only on the mesh that saved it")
            gradients = _startup_gradients(config, model_config, params, data, layout, tokenizer, log)
    trainable, frozen, base = _adapted_parts(config, plan, params, gradients)
    return RunSetup(plan=plan, model_path=path, tokenizer=tokenizer, trainable=trainable, frozen=frozen, base=base,
                    data=data, eval_rows=eval_rows, eval_task=eval_task, rows=rows)


def setup_from_checkpoint(config: RunConfig, *, layout: Layout, total_steps: int, selection: Any,
                          read_start: Callable[[dict], dict | None]) -> RunSetup | None:
    """A saved run's setup from the model and its checkpoint alone, without the data pipeline or a
    start-up gradient: the method's start-up choice as the checkpoint recorded it (`selection`, JSON) and
    the adapters' starting values read by `read_start` (see `prepare_run`). `data`, `eval_rows` and
    `eval_task` are None. None when the checkpoint lacks starting values its method drew from a start-up
    gradient (saved by an earlier version): only `prepare_run` can draw them again, from the data."""
    rows, (model_config, params, tokenizer, path) = _rows_and_model(config, layout)
    method = method_of(config)
    plan = plan_run(config, model_config, layout, total_steps,
                    None if selection is None else method.selection_from_json(selection))
    start = plan.abstract_start()
    gradients = read_start(start) if start else None
    if start and gradients is None:
        return None
    trainable, frozen, base = _adapted_parts(config, plan, params, gradients)
    return RunSetup(plan=plan, model_path=path, tokenizer=tokenizer, trainable=trainable, frozen=frozen, base=base,
                    data=None, eval_rows=None, eval_task=None, rows=rows)


def _rows_and_model(config: RunConfig, layout: Layout):
    """`((index, count) of this process's rows, load_model(...))`, after checking that the batch splits
    over the mesh and that the model suits the config."""
    check_batch_split(config, layout)
    rows = layout.process_rows(config.train.micro_batch)
    loaded = load_model(config, layout)
    config.check_model(loaded[0])
    return rows, loaded


def _adapted_parts(config: RunConfig, plan: RunPlan, params: dict, gradients: dict | None) -> tuple[Any, dict, Any]:
    """`(trainable, frozen, base)` of the adapted tree of `params` on the plan's devices."""
    # Op by op rather than one jitted program: XLA:CPU can deadlock on a program with many independent
    # collectives over fake devices (the randomized SVDs of LoRA-GA on FSDP-split gradients did).
    adapted = adapters.apply(plan.spec, params, jax.random.key(config.train.seed), gradients=gradients)
    del params, gradients
    plan.check_adapted(adapted)
    return plan.split(jax.device_put(adapted, plan.adapted_shardings))
