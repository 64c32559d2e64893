"""The typed sections of a run configuration (all but `method`, which lives in `methods.py`).

Each section is a frozen dataclass; `__post_init__` checks ranges and choices with messages that start
with `field=value` (the loader prefixes the section, giving e.g. `train.schedule='cosin' must be ...`).
configs/base.yaml repeats every field with its comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from hyjax.model.config import REMAT_POLICIES

DTYPES = ("float32", "bfloat16", "float16")
# `model.path` values that name a checkpoint hyjax fetches itself (see hyjax.pretrained).
PRETRAINED = ("smollm2-135m-instruct",)
TASKS = ("classification", "sst2", "math", "gsm8k", "instructions")  # hyjax.data.TASKS
FORMATS = ("tsv", "csv", "jsonl", "parquet", "disk")  # hyjax.data.FORMATS
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
DIRECTIONS = ("proportional", "inverse")  # hyjax.optim.hybrid_weights.DIRECTIONS


def one_of(field: str, value, allowed) -> None:
    """Raises `field='x' must be one of [...]` (with the closest choice) unless value is allowed."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{field}={value!r} must be one of {list(allowed)}{hint}")


def at_least(field: str, value, low, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ValueError(f"{field}={value!r} must be >= {low}" + (" (or null)" if allow_none else ""))


def in_range(field: str, value, low, high, low_open=False, high_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"{field}={value!r} must be in {interval}" + (" (or null)" if allow_none else ""))


def valid_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression: {err}") from err


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to fine-tune and how to compute with it."""

    # Architecture preset (hyjax.model.presets, e.g. "smollm2-135m", "llama3.1-8b"); null: read the
    # architecture from the checkpoint at `path`. Both given: the checkpoint must match the preset.
    preset: str | None = "smollm2-135m"
    # Checkpoint: a .gguf file, a Hugging Face folder (config.json + safetensors), or a name hyjax fetches
    # itself ("smollm2-135m-instruct": the real SmolLM2-135M-Instruct, see hyjax.pretrained). null:
    # random initialisation from the preset (for compile and memory checks).
    path: str | None = "smollm2-135m-instruct"
    # Tokenizer file or folder (.gguf, sentencepiece .model, tokenizer.json); null: the checkpoint's own.
    tokenizer: str | None = None
    # Model family, for the default adapter targets (hyjax.adapters.targets.DEFAULT_TARGETS).
    family: str = "llama"
    param_dtype: str = "float32"  # storage dtype of the frozen weights
    dtype: str = "float32"  # dtype of matmuls and activations (norms, softmax, logits stay float32)
    remat: str = "none"  # what the scanned layers save for backward: none | full | dots | dots_no_batch

    def __post_init__(self):
        if self.preset is None and self.path is None:
            raise ValueError("preset=None and path=None: give a preset, a checkpoint path, or both")
        if self.preset is not None:
            from hyjax.model.presets import PRESETS
            one_of("preset", self.preset.lower(), sorted(PRESETS))
        from hyjax.adapters.targets import DEFAULT_TARGETS
        one_of("family", self.family, sorted(DEFAULT_TARGETS))
        one_of("param_dtype", self.param_dtype, DTYPES)
        one_of("dtype", self.dtype, DTYPES)
        one_of("remat", self.remat, REMAT_POLICIES)

    @property
    def pretrained(self) -> bool:
        """Whether `path` names a checkpoint hyjax fetches itself."""
        return self.path in PRETRAINED

    def preset_config(self):
        """The preset's `LlamaConfig` with this section's dtypes and remat (None without a preset)."""
        if self.preset is None:
            return None
        from hyjax.model.presets import preset
        return preset(self.preset, param_dtype=self.param_dtype, dtype=self.dtype, remat=self.remat)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The training data: a file, a task that turns its rows into (prompt, answer) pairs, batching."""

    path: str | None = None  # tsv/csv/jsonl/parquet file or save_to_disk folder (required to train)
    format: str | None = None  # one of tsv, csv, jsonl, parquet, disk; null: from the file suffix
    split: str | None = None  # split of a saved DatasetDict folder
    task: str = "classification"  # classification (sst2) | math (gsm8k) | instructions
    text_column: str | None = None  # text / question / prompt column; null: the task's default
    label_column: str | None = None  # label / answer / completion column; null: the task's default
    # classification: [label, answer text] pairs, e.g. [[0, " negative"], [1, " positive"]]; null: SST-2's
    verbalizer: tuple[tuple[int | str, str], ...] | None = None
    template: str | None = None  # prompt template ({text} or {question} or {prompt}); null: the task's
    chat: bool | str = "auto"  # wrap prompts in the tokenizer's chat template: auto | true | false
    system: str | None = None  # system message in chat mode
    max_length: int = 512  # tokens per row; longer examples lose prompt tokens from the left
    bucket: int = 64  # without packing, pad the row length up to a multiple of this
    packing: bool = False  # pack several examples per row instead of padding each
    max_rows: int | None = None  # use only the first N rows of the file (a slice); null: all
    eval_path: str | None = None  # held-out file for evaluation; null: split the training file
    eval_fraction: float | None = None  # without eval_path: hold out this share of the rows...
    eval_count: int | None = None  # ...or this many rows (null and null: no held-out set)
    max_bad_fraction: float | None = 0.01  # stop when more than this share of rows is malformed...
    max_bad_rows: int | None = 100  # ...or more than this many (null: no limit)
    shuffle_seed: int = 0  # shuffling per epoch and the held-out split

    def __post_init__(self):
        one_of("task", self.task, TASKS)
        if self.format is not None:
            one_of("format", self.format, FORMATS)
        if isinstance(self.chat, str):
            one_of("chat", self.chat, ("auto",))
        if self.verbalizer is not None:
            if self.task not in ("classification", "sst2"):
                raise ValueError(f"verbalizer={list(self.verbalizer)!r} only applies to task=classification, "
                                 f"not task={self.task!r}")
            labels = [str(label) for label, _ in self.verbalizer]
            if not labels or len(set(labels)) != len(labels):
                raise ValueError(f"verbalizer={list(self.verbalizer)!r} needs distinct labels, at least one")
        at_least("max_length", self.max_length, 2)
        at_least("bucket", self.bucket, 1)
        at_least("max_rows", self.max_rows, 1, allow_none=True)
        in_range("eval_fraction", self.eval_fraction, 0, 1, low_open=True, high_open=True, allow_none=True)
        at_least("eval_count", self.eval_count, 1, allow_none=True)
        if self.eval_fraction is not None and self.eval_count is not None:
            raise ValueError(f"eval_fraction={self.eval_fraction} and eval_count={self.eval_count}: give one")
        if self.eval_path is not None and (self.eval_fraction is not None or self.eval_count is not None):
            raise ValueError(f"eval_path={self.eval_path!r} is given, so eval_fraction and eval_count must "
                             "be null (nothing is held out of the training file)")
        in_range("max_bad_fraction", self.max_bad_fraction, 0, 1, allow_none=True)
        at_least("max_bad_rows", self.max_bad_rows, 0, allow_none=True)

    def task_options(self) -> dict:
        """Fields of the task class in `hyjax.data` (Classification, MathWordProblems, Instructions)."""
        kind = {"sst2": "classification", "gsm8k": "math"}.get(self.task, self.task)
        text, label = {"classification": ("text_column", "label_column"),
                       "math": ("question_column", "answer_column"),
                       "instructions": ("prompt_column", "completion_column")}[kind]
        options = {}
        if self.text_column is not None:
            options[text] = self.text_column
        if self.label_column is not None:
            options[label] = self.label_column
        if self.template is not None:
            options["template"] = self.template
        if self.verbalizer is not None:
            options["answers"] = tuple(tuple(pair) for pair in self.verbalizer)
        return options

    def to_data_config(self, global_batch_size: int):
        """The `hyjax.data.DataConfig` for the training file."""
        if self.path is None:
            from hyjax.config.typed import ConfigError
            raise ConfigError("data.path is not set: give the training file (e.g. data.path=train.tsv)")
        from hyjax.data import DataConfig
        return DataConfig(path=self.path, task=self.task, task_options=self.task_options(), format=self.format,
                          split=self.split, chat=self.chat, system=self.system,
                          max_bad_fraction=self.max_bad_fraction, max_bad_rows=self.max_bad_rows,
                          max_length=self.max_length, bucket=self.bucket, pack=self.packing,
                          global_batch_size=global_batch_size, seed=self.shuffle_seed,
                          eval_fraction=self.eval_fraction, eval_count=self.eval_count, max_rows=self.max_rows)


@dataclasses.dataclass(frozen=True)
class HybridWeightsSection:
    """The Optax transform that sets each hybrid layer's lambda (hyjax.optim.hybrid_weights); its `mix`
    is `method.hybrid.mix`."""

    direction: str = "proportional"  # proportional: the branch with the larger gradient gets more | inverse
    temperature: float = 1.0  # tau > 0 of the norm ratio
    ema: float = 0.9  # beta in [0, 1) of the moving average of the target share
    clip: tuple[float, float] = (0.05, 0.95)  # [lo, hi] within [0, 1]
    warmup_steps: int = 10  # lambda stays 0.5 for this many steps
    share_correction: bool | None = None  # divide each branch's norm by its share; null: when mix=weight

    def __post_init__(self):
        one_of("direction", self.direction, DIRECTIONS)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        in_range("ema", self.ema, 0, 1, high_open=True)
        lo, hi = self.clip
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"clip={list(self.clip)} must satisfy 0 <= lo <= hi <= 1")
        at_least("warmup_steps", self.warmup_steps, 0)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Steps, batches, optimizer and learning-rate schedule."""

    steps: int | None = 1000  # optimizer steps; null: run `epochs` instead
    epochs: float | None = None  # passes over the training data (with steps null)
    global_batch_size: int = 8  # sequences per optimizer step over all devices and processes
    micro_batch_size: int | None = None  # sequences per forward/backward; accumulation = global / micro
    learning_rate: float = 1e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | linear (decay to final_lr_fraction) | constant, after warmup
    warmup_steps: int = 0  # linear warmup from 0 to the peak learning rate
    final_lr_fraction: float = 0.0  # cosine/linear end at learning_rate * this
    optimizer: str = "adamw"  # adamw | adafactor | sgd
    weight_decay: float = 0.0  # decoupled weight decay (adamw, adafactor)
    b1: float = 0.9  # Adam beta1 (sgd: momentum, 0 for plain SGD)
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    grad_clip_norm: float | None = 1.0  # clip the global gradient norm to this; null: no clipping
    # Ordered (regex over parameter paths, learning-rate multiplier) table, first match wins;
    # multiplier 0 freezes. E.g. [["layers/.*/boft_.*", 10.0]]. Unmatched parameters: 1.
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    seed: int = 0  # parameter initialisation, dropout
    # A step whose gradient is not finite (NaN/inf) is skipped and reported; this many in a row stop the run.
    max_skipped_steps: int = 10
    hybrid_weights: HybridWeightsSection = HybridWeightsSection()

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"steps={self.steps} and epochs={self.epochs}: give exactly one (the other null)")
        at_least("steps", self.steps, 1, allow_none=True)
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0")
        at_least("global_batch_size", self.global_batch_size, 1)
        at_least("micro_batch_size", self.micro_batch_size, 1, allow_none=True)
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide "
                             f"global_batch_size={self.global_batch_size} (gradient accumulation = global / micro)")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        one_of("schedule", self.schedule, SCHEDULES)
        at_least("warmup_steps", self.warmup_steps, 0)
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps={self.steps}")
        in_range("final_lr_fraction", self.final_lr_fraction, 0, 1)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        at_least("weight_decay", self.weight_decay, 0)
        in_range("b1", self.b1, 0, 1, high_open=True)
        in_range("b2", self.b2, 0, 1, high_open=True)
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm={self.grad_clip_norm} must be > 0 (or null: no clipping)")
        at_least("max_skipped_steps", self.max_skipped_steps, 1)
        for i, (pattern, multiplier) in enumerate(self.lr_multipliers):
            valid_regex(f"lr_multipliers[{i}]", pattern)
            at_least(f"lr_multipliers[{i}]", multiplier, 0)

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.global_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.global_batch_size // self.micro_batch


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """How the run's devices form a `data x fsdp x tensor` mesh, and how arrays are split over it."""

    data: int = -1  # data-parallel ways; -1: every device the other axes leave
    fsdp: int = 1  # fully sharded data parallel: batch and weights' embed dimension split this many ways
    tensor: int = 1  # tensor parallel: heads, kv_heads, mlp and vocab dimensions split this many ways
    slices: int = 1  # TPU slices joined over the data-centre network (data parallel across them)
    # Overrides of the rules table (hyjax/sharding/rules.py): [logical axis, [mesh axes]] pairs,
    # e.g. [["vocab", []], ["mlp", ["fsdp", "tensor"]]]; an empty list replicates that dimension.
    rules: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        from hyjax.sharding.mesh import check_sizes
        from hyjax.sharding.rules import Rules

        check_sizes(self.sizes())  # bad sizes and unknown axis names fail here, before anything runs
        at_least("slices", self.slices, 1)
        Rules().override(self.rules)

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints of the adapters, optimizer state, step, data position and rng."""

    dir: str | None = None  # null: <logging.output_dir>/checkpoints
    every_steps: int = 500  # save every N steps (and at the end); 0: only at the end
    keep: int | None = 3  # keep the last K checkpoints; null: all
    async_save: bool = True  # write in the background while training continues
    resume: bool = True  # continue from the latest checkpoint in dir when there is one

    def __post_init__(self):
        at_least("every_steps", self.every_steps, 0)
        at_least("keep", self.keep, 1, allow_none=True)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Evaluation on the held-out data during and after training."""

    every_steps: int = 0  # evaluate every N steps (and at the end); 0: only at the end
    before_training: bool = True  # also evaluate the model before the first step (not when resuming)
    batch_size: int = 16  # held-out sequences per forward pass
    num_examples: int | None = 200  # held-out examples per evaluation; null: all
    generation_samples: int = 2  # examples whose generated answer is logged
    max_new_tokens: int = 32  # tokens generated per sample (math exact match, logged samples)

    def __post_init__(self):
        at_least("every_steps", self.every_steps, 0)
        at_least("batch_size", self.batch_size, 1)
        at_least("num_examples", self.num_examples, 1, allow_none=True)
        at_least("generation_samples", self.generation_samples, 0)
        at_least("max_new_tokens", self.max_new_tokens, 1)


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Where a run writes and how often it reports."""

    output_dir: str = "runs/default"  # run folder: resolved config.yaml, metrics, checkpoints, exports
    every_steps: int = 10  # log loss, learning rate, throughput (and hybrid lambdas) every N steps
    tensorboard: bool = False  # also write TensorBoard event files
    progress_bar: bool = True  # a tqdm progress bar on the terminal

    def __post_init__(self):
        at_least("every_steps", self.every_steps, 1)


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """What the run leaves behind besides checkpoints (in <logging.output_dir>/export)."""

    peft_adapter: bool = True  # Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors)
    merged_model: bool = False  # the merged model as a Hugging Face safetensors folder
