"""The typed sections of a run configuration (all but `method`, in `methods.py`, and `data`, which is
`hyjax.data.DataConfig`).

Each section is a frozen dataclass; `__post_init__` checks ranges and choices with messages that start
with `field=value` (the loader prefixes the section, giving e.g. `train.schedule='cosin' must be ...`).
configs/base.yaml repeats every field with its comment.
"""

from __future__ import annotations

import dataclasses

from hyjax.adapters.targets import DEFAULT_TARGETS
from hyjax.model import presets
from hyjax.model.config import DTYPES, REMAT_POLICIES
from hyjax.optim.optimizers import OPTIMIZERS
from hyjax.optim.schedule import SCHEDULES
from hyjax.pretrained import SMOLLM2_135M_INSTRUCT, is_known
from hyjax.rl.objective import AGGREGATIONS
from hyjax.rl.rewards import resolve_reward
from hyjax.sharding.mesh import check_sizes
from hyjax.weights.gguf_writer import GGUF_FILE_TYPES
from hyjax.sharding.rules import Rules
from hyjax.validation import at_least, in_range, one_of, valid_regex
from pallas_kernels.dispatch import IMPLS


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to fine-tune and how to compute with it."""

    # Architecture preset (hyjax.model.presets, e.g. "smollm2-135m", "llama3.1-8b"); null: read the
    # architecture from the checkpoint at `path`. Both given: the checkpoint must match the preset.
    preset: str | None = "smollm2-135m"
    # Checkpoint: a .gguf file, a Hugging Face folder (config.json + safetensors), a Hub name (org/name,
    # org/name@revision, org/name/file.gguf; see hyjax.hub), or a name hyjax fetches itself
    # ("smollm2-135m-instruct": the real SmolLM2-135M-Instruct, see hyjax.pretrained). null:
    # random initialisation from the preset (for compile and memory checks).
    path: str | None = SMOLLM2_135M_INSTRUCT
    # Tokenizer file or folder (.gguf, sentencepiece .model, tokenizer.json); null: the checkpoint's own.
    tokenizer: str | None = None
    # Model family, for the default adapter targets (hyjax.adapters.targets.DEFAULT_TARGETS).
    family: str = "llama"
    param_dtype: str = "float32"  # storage dtype of the frozen weights
    dtype: str = "float32"  # dtype of matmuls and activations (norms, softmax, logits stay float32)
    remat: str = "none"  # what the scanned layers save for backward: none | full | dots | dots_no_batch
    # Attention kernels: auto (flash attention through Pallas on TPU and GPU, XLA on CPU) | xla | pallas
    attention: str = "auto"

    def __post_init__(self):
        if self.preset is None and self.path is None:
            raise ValueError("preset=None and path=None: give a preset, a checkpoint path, or both")
        if self.preset is not None:
            one_of("preset", self.preset.lower(), sorted(presets.PRESETS))
        one_of("family", self.family, sorted(DEFAULT_TARGETS))
        one_of("param_dtype", self.param_dtype, DTYPES)
        one_of("dtype", self.dtype, DTYPES)
        one_of("remat", self.remat, REMAT_POLICIES)
        one_of("attention", self.attention, IMPLS)

    @property
    def pretrained(self) -> bool:
        """Whether `path` names a checkpoint hyjax fetches itself (`hyjax.pretrained.KNOWN`)."""
        return is_known(self.path)

    def preset_config(self):
        """The preset's `LlamaConfig` with this section's computation settings (None without a preset)."""
        if self.preset is None:
            return None
        return presets.preset(self.preset, **self.computation)

    @property
    def computation(self) -> dict:
        """The `LlamaConfig` fields this section sets on any architecture: dtypes, remat, attention."""
        return dict(param_dtype=self.param_dtype, dtype=self.dtype, remat=self.remat, attention=self.attention)


OBJECTIVES = ("sft", "grpo")  # what train.objective takes


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
    # Clip each lr_multipliers group's gradient by its own norm instead of one norm over all of them, so a
    # large gradient in one group (the hybrid's LoRA-GA branch) does not scale down another's (its BOFT branch).
    # Per group the clipping comes after what a method adds before the base optimizers (the hybrid's lambda
    # rule, which then sees unclipped norms).
    grad_clip_per_group: bool = False
    # Ordered (regex over parameter paths, learning-rate multiplier) table, first match wins;
    # multiplier 0 freezes. E.g. [["layers/.*/boft_.*", 10.0]]. Unmatched parameters: 1.
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    seed: int = 0  # parameter initialisation, dropout
    # A step whose gradient is not finite (NaN/inf) is skipped and reported; this many in a row stop the run.
    max_skipped_steps: int = 10
    objective: str = "sft"  # sft: the answer tokens' cross-entropy | grpo: rewards of sampled completions (grpo:)

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
        at_least("seed", self.seed, 0)
        one_of("objective", self.objective, OBJECTIVES)
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
class GRPOSection:
    """Reinforcement learning from verifiable rewards (`train.objective: grpo`, hyjax.rl): each step samples
    `group_size` completions of `train.global_batch_size / group_size` prompts of the data file (a math
    task: question and answer columns), rewards them, and takes `num_iterations` optimizer updates of the
    clipped-ratio loss on them."""

    group_size: int = 8  # completions sampled per prompt (G); must divide train.global_batch_size
    num_iterations: int = 1  # optimizer updates per sampled batch (1: the ratio is 1 and the clip idle)
    temperature: float = 1.0  # of the sampling distribution, whose log-probabilities the loss uses
    top_p: float = 1.0  # nucleus sampling (not in the log-probabilities)
    max_new_tokens: int = 128  # per completion; it also ends at the tokenizer's stop tokens
    beta: float = 0.04  # weight of the k3 KL penalty to the reference policy (0: none)
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    aggregation: str = "sequence_mean"  # sequence_mean (mean of each completion's token mean) | token_mean
    # [reward name, weight] pairs summed: final_number, answer_format, or package.module:function
    rewards: tuple[tuple[str, float], ...] = (("final_number", 1.0), ("answer_format", 0.1))

    def __post_init__(self):
        at_least("group_size", self.group_size, 2)
        at_least("num_iterations", self.num_iterations, 1)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0: GRPO samples its completions")
        in_range("top_p", self.top_p, 0, 1, low_open=True)
        at_least("max_new_tokens", self.max_new_tokens, 1)
        at_least("beta", self.beta, 0)
        in_range("clip_low", self.clip_low, 0, 1, high_open=True)
        at_least("clip_high", self.clip_high, 0)
        one_of("aggregation", self.aggregation, AGGREGATIONS)
        if not self.rewards:
            raise ValueError("rewards=[] names no reward: give [name, weight] pairs, e.g. [[final_number, 1.0]]")
        for name, _ in self.rewards:
            resolve_reward(name)  # an unknown name or a module that does not import fails here


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
    # With several processes, steps between agreements on a stop request (a collective; one process alone
    # reads its own every step): a SIGTERM is honoured, and its checkpoint saved, within this many steps.
    stop_check_every: int = 4

    def __post_init__(self):
        at_least("every_steps", self.every_steps, 0)
        at_least("keep", self.keep, 1, allow_none=True)
        at_least("stop_check_every", self.stop_check_every, 1)


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
    every_steps: int = 10  # log learning rate, throughput (and what the method logs) every N steps; the loss every step
    tensorboard: bool = False  # also write TensorBoard event files
    progress_bar: bool = True  # a tqdm progress bar on the terminal

    def __post_init__(self):
        at_least("every_steps", self.every_steps, 1)


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """What the run leaves behind besides checkpoints (in <logging.output_dir>/export)."""

    peft_adapter: bool = True  # Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors)
    merged_model: bool = False  # the merged model as a Hugging Face safetensors folder
    gguf: str | None = None  # the merged model as one GGUF file (llama.cpp, ollama): f32, f16, bf16 or q8_0
    gguf_lora: bool = False  # the LoRA adapter as a GGUF LoRA file (llama.cpp's --lora); plain LoRA only

    def __post_init__(self):
        if self.gguf is not None:
            one_of("gguf", self.gguf, sorted(GGUF_FILE_TYPES))

    @property
    def requested(self) -> bool:
        """Whether the run exports anything."""
        return self.peft_adapter or self.merged_model or self.gguf is not None or self.gguf_lora
