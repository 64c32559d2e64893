"""Everything a run needs before its first step: checks that need no model, then the model, tokenizer,
data, adapters (LoRA-GA's gradient estimate included) and optimizer.

`preflight` runs first and only reads the config and the file system, so a missing data file or an
unwritable output folder is reported before any download or compile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import uuid
from typing import Any

import jax

from hyjax import adapters
from hyjax.config import ConfigError, RunConfig
from hyjax.data import BatchIterator, PreparedData, load_rows, make_task, prepare
from hyjax.training.optimizer import build_optimizer
from hyjax.adapters import Selection
from hyjax.training.module_selection import choose_modules, module_sizes, selection_spec
from hyjax.training.step import AnswerLoss
from hyjax.training.zeroth_order import from_config as zeroth_order_from_config


def preflight(config: RunConfig) -> None:
    """Raises `ConfigError` naming the key to fix when a data file is missing or the output folder
    cannot be written. Touches nothing but a probe file in the output folder."""
    for key in ("path", "eval_path"):
        value = getattr(config.data, key)
        if key == "path" and value is None:
            raise ConfigError("data.path is not set: give the training file, e.g. data.path=train.tsv "
                              "(tsv, csv, jsonl, parquet, or a save_to_disk folder)")
        if value is not None and not pathlib.Path(value).exists():
            raise ConfigError(f"data.{key}={value!r} does not exist (relative paths are read from the working "
                              f"directory {os.getcwd()})")
    if config.model.tokenizer is not None and not pathlib.Path(config.model.tokenizer).exists():
        raise ConfigError(f"model.tokenizer={config.model.tokenizer!r} does not exist")
    if config.model.path is not None and not config.model.pretrained and not pathlib.Path(config.model.path).exists():
        raise ConfigError(f"model.path={config.model.path!r} does not exist: give a .gguf file, a Hugging Face "
                          "folder, or smollm2-135m-instruct")
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
    """What makes checkpoints of two runs interchangeable: the model and the whole method section."""
    model = config.model
    return {"model": {"preset": model.preset, "path": model.path, "family": model.family},
            "method": config.to_dict()["method"]}


@dataclasses.dataclass
class RunSetup:
    """A run, ready to train: model and tokenizer, frozen and initial trainable parameters, data,
    optimizer and the step count."""

    config: RunConfig
    model_config: Any  # LlamaConfig
    model_path: pathlib.Path | None
    tokenizer: Any
    trainable: Any  # initial trainable adapter parameters (host or local device arrays)
    frozen: dict  # everything else of the adapted tree (less `base`)
    base: Any  # the base weights trained zeroth-order (method zo_fo; None otherwise)
    zeroth_order: Any  # hyjax.training.zeroth_order.ZerothOrder of method zo_fo, else None
    data: PreparedData
    eval_rows: Any  # held-out rows, at most eval.num_examples (None: no evaluation)
    eval_task: Any  # the task format resolved against the held-out rows' columns
    optimizer: Any
    schedule: Any
    total_steps: int
    trainable_counts: dict[str, int]
    shardings: Any  # hyjax.training.layout.StepShardings of the state, frozen tree and batches
    rows: tuple[int, int]  # (index, count) of this process's part of each batch
    selection: Any = None  # hyjax.adapters.Selection of method hybrid_lora (the fully trained modules)

    @property
    def hybrid(self) -> bool:
        return self.config.method.name == "hybrid"


def load_model(config: RunConfig, layout):
    """`(model_config, params, tokenizer, checkpoint path)` of `config.model`, the weights placed on
    `layout`'s devices as they are read: each process reads only the slices its devices hold."""
    from hyjax import pretrained
    from hyjax.checkpoints import load_checkpoint_sharded
    from hyjax.model import init_params
    from hyjax.tokenization import load_tokenizer
    from hyjax.training.layout import base_shardings

    section = config.model
    dtypes = dict(param_dtype=section.param_dtype, dtype=section.dtype, remat=section.remat)
    path = None
    if section.path is None:
        model_config = section.preset_config()
        params = jax.jit(init_params, static_argnums=0, out_shardings=base_shardings(layout, model_config))(
            model_config, jax.random.key(config.train.seed))
    else:
        path = pretrained.smollm2_135m_instruct() if section.pretrained else pathlib.Path(section.path)
        model_config, params = load_checkpoint_sharded(path, lambda found: base_shardings(layout, found), **dtypes)
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
    return model_config, params, tokenizer, path


_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "tie_embeddings")


def _architecture(model_config) -> tuple:
    return tuple(getattr(model_config, name) for name in _ARCHITECTURE)


def _architecture_difference(expected, found) -> str:
    return ", ".join(f"{name} {getattr(found, name)} (preset {getattr(expected, name)})"
                     for name in _ARCHITECTURE if getattr(expected, name) != getattr(found, name))


def _eval_rows(config: RunConfig, data: PreparedData):
    rows = data.eval_rows
    if config.data.eval_path is not None:
        rows = load_rows(config.data.eval_path, format=config.data.format)
    if rows is None:
        return None
    if config.eval.num_examples is not None and len(rows) > config.eval.num_examples:
        rows = rows.select(range(config.eval.num_examples))
    return rows


def total_steps(config: RunConfig, batches: BatchIterator) -> int:
    """`train.steps`, or `train.epochs` passes over the data in steps."""
    if config.train.steps is not None:
        return config.train.steps
    return max(1, math.ceil(config.train.epochs * batches.steps_per_epoch(0)))


def _gradient_batches(config: RunConfig, data: PreparedData, layout):
    """The batches the start-up gradient is averaged over (`MethodSection.gradient_batches`: n batches
    of `batch_size` training examples), in an order of their own (the same on every process), split
    over the mesh like training batches when their rows divide (else every device computes all rows)."""
    from hyjax.sharding import put_local

    n_batches, batch_size = config.method.gradient_batches
    batches = BatchIterator(data.train.examples, global_batch_size=batch_size,
                            max_length=data.train.max_length, pad_id=data.train.pad_id,
                            seed=config.data.shuffle_seed + 1, bucket=data.train.bucket, process_index=0,
                            process_count=1)
    split = batch_size % layout.ways("batch") == 0
    rows = layout.sharding(("batch", "seq"))
    for _ in range(n_batches):
        batch = next(batches)
        yield {key: put_local(value, rows) for key, value in batch.items()} if split else batch


def prepare_run(config: RunConfig, *, layout, data_position: dict | None = None, selection: dict | None = None,
                log=print) -> RunSetup:
    """Loads the model and data and builds adapters and optimizer on `layout` (a `hyjax.sharding.Layout`;
    every process calls this identically). `selection`: Hybrid-LoRA's module choice as a checkpoint
    recorded it (`Selection.to_json`), instead of scoring the modules again."""
    from hyjax.training.layout import adapted_shardings, check_batch_split, step_shardings

    check_batch_split(config, layout)
    rows = layout.process_rows(config.train.micro_batch)
    model_config, params, tokenizer, path = load_model(config, layout)
    config.check_model(model_config)
    data = prepare(config.to_data_config(), tokenizer, process_index=rows[0], process_count=rows[1],
                   position=data_position)
    if data.train.steps_per_epoch(0) == 0:
        raise ConfigError(f"{len(data.train.examples)} training examples make no full batch of "
                          f"train.global_batch_size={config.train.global_batch_size}; lower it or add data")
    log(f"data: {data.report.summary()}")
    eval_rows = _eval_rows(config, data)
    eval_task = None
    if eval_rows is not None:  # a separate eval file may name its columns differently (SST-2's dev.tsv does)
        eval_task = make_task(config.to_data_config()).resolve(eval_rows.column_names, eval_rows.path)
    spec = config.to_adapter_spec()
    hybrid_lora = config.method.name == "hybrid_lora"
    selection = Selection.from_json(selection) if hybrid_lora and selection is not None else None
    gradients = None
    if config.method.from_gradients and selection is None:
        n_batches, batch_size = config.method.gradient_batches
        log(f"{config.method.name}: averaging the full gradient over {n_batches} batches of {batch_size}")
        gradients = adapters.estimate_gradients(model_config, params, _gradient_batches(config, data, layout),
                                                targets=spec, loss_fn=AnswerLoss(model_config), n_batches=n_batches)
    if hybrid_lora:
        if selection is None:
            selection = choose_modules(config.method, gradients, module_sizes(gradients))
            gradients = None
        log(f"hybrid_lora modules:\n{selection.table()}")
        spec = selection_spec(config.method, selection, model_config.num_layers)
    # Op by op rather than one jitted program: XLA:CPU can deadlock on a program with many independent
    # collectives over fake devices (the randomized SVDs of LoRA-GA on FSDP-split gradients did).
    adapted = adapters.apply(spec, params, jax.random.key(config.train.seed), gradients=gradients)
    adapted = jax.device_put(adapted, adapted_shardings(layout, model_config, adapted))
    del params, gradients
    trainable, frozen = adapters.split_trainable(adapted)
    steps = total_steps(config, data.train)
    optimizer, schedule = build_optimizer(config, steps)
    zeroth_order = zeroth_order_from_config(config, steps)
    base = None
    if zeroth_order is not None:
        base, frozen = zeroth_order.split(frozen)
    return RunSetup(config=config, model_config=model_config, model_path=path, tokenizer=tokenizer,
                    trainable=trainable, frozen=frozen, base=base, zeroth_order=zeroth_order, data=data,
                    eval_rows=eval_rows, eval_task=eval_task, optimizer=optimizer, schedule=schedule,
                    total_steps=steps, trainable_counts=adapters.count_trainable(adapted),
                    shardings=step_shardings(layout, model_config, adapted, optimizer, zeroth_order), rows=rows,
                    selection=selection)
