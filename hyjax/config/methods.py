"""The `method` section: which method (`hyjax.methods`), where, and every method's hyperparameters.

Sub-sections are the adapters' own config dataclasses (`hyjax.adapters.LoRAConfig`, ...), so their
fields, defaults and validation are the adapters'. The exception is `unitary`: `UnitaryConfig` asks JAX
for its backend when built, which must not happen before `jax.distributed.initialize`, so the section
mirrors its fields (a test keeps the two in step) and the method builds the real one.

Adding a method: its `Method` registered (hyjax/methods/registry.py, or `hyjax.methods.register`) and
configs/methods/<name>.yaml. Its own hyperparameters go in `method.settings`, read as the dataclass it
names (`Method.settings_type`); the sub-sections here are those of the methods hyjax ships.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hyjax.adapters import BOFTConfig, LoRAConfig, LoRAGAConfig
from hyjax.adapters.hybrid import LORA_STARTS, MIXES
from hyjax.config.typed import ConfigError, build
from hyjax.methods import METHODS, method_of
from hyjax.methods.hybrid_lora import SCORES
from hyjax.methods.zo_fo import ZerothOrderFirstOrder
from hyjax.model.config import DTYPES
from hyjax.validation import at_least, in_range, one_of, valid_regex
from pallas_kernels.dispatch import IMPLS


@dataclasses.dataclass(frozen=True)
class UnitarySection:
    """`hyjax.adapters.UnitaryConfig`'s fields (see its docstring)."""

    impl: str = "auto"  # auto (Pallas on TPU/GPU, XLA on CPU) | xla | pallas
    full_capacity: bool = False  # a dense d_in x d_in orthogonal matrix instead (small d_in only)
    max_full_capacity_dim: int = 1024  # full_capacity is refused above this d_in
    perm_seed: int = 0  # seed of the fixed permutation Pi
    dtype: str = "float32"  # dtype of the trainable parameters

    def __post_init__(self):
        one_of("impl", self.impl, IMPLS)
        if self.max_full_capacity_dim < 1:
            raise ValueError(f"max_full_capacity_dim={self.max_full_capacity_dim} must be >= 1")
        at_least("perm_seed", self.perm_seed, 0)
        one_of("dtype", self.dtype, DTYPES)


@dataclasses.dataclass(frozen=True)
class HybridSection:
    """The hybrid BOFT + LoRA-GA method: its branches are `method.boft` and `method.lora_ga`."""

    mix: str = "weight"  # weight: lambda weights the branch outputs | update: lambda scales their updates
    # gradient: the LoRA branch is LoRA-GA (method.lora_ga) | zero: plain LoRA (method.lora; B = 0), a control
    lora_start: str = "gradient"

    def __post_init__(self):
        one_of("mix", self.mix, MIXES)
        one_of("lora_start", self.lora_start, LORA_STARTS)



@dataclasses.dataclass(frozen=True)
class ZerothOrderSection:
    """The ZO + FO hybrid: base weights trained by two-point SPSA (MeZO), an adapter by backprop, at
    the same point each step (see hyjax.optim.zeroth_order)."""

    adapter: str = "lora"  # the first-order adapter: lora | oft | boft | unitary (its own sub-section)
    learning_rate: float = 1e-6  # peak learning rate of the SPSA updates (train.learning_rate: the adapter's)
    mu: float = 1e-3  # perturbation scale
    directions: int = 1  # SPSA directions averaged per step, two forward passes each
    weight_decay: float = 0.0  # decoupled weight decay of the SPSA-trained weights
    targets: tuple[str, ...] = (".*",)  # regexes over weight paths trained by SPSA (default: every weight)

    def __post_init__(self):
        one_of("adapter", self.adapter, list(ZerothOrderFirstOrder.ADAPTERS))
        for name in ("learning_rate", "mu"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        at_least("directions", self.directions, 1)
        at_least("weight_decay", self.weight_decay, 0)
        if not self.targets:
            raise ValueError("targets is empty: give at least one regex of weights to train by SPSA, e.g. ['.*']")
        for i, pattern in enumerate(self.targets):
            valid_regex(f"targets[{i}]", pattern)


@dataclasses.dataclass(frozen=True)
class HybridLoRASection:
    """Hybrid-LoRA: a scoring pass over the pretrained model picks the target modules (one projection
    of one layer each) to fine-tune fully; the rest get LoRA (method.lora). See
    hyjax.methods.hybrid_lora.module_scores."""

    fraction: float = 0.1  # share of the target modules fully fine-tuned (rounded down, at least one)
    max_params: int | None = None  # instead of fraction: fully fine-tuned parameters at most (best modules that fit)
    score: str = "grad_norm_x_residual"  # grad_norm_x_residual | grad_norm | residual_share | residual_norm | random
    rank: int | None = None  # r of the residual energy (outside the best rank-r approximation); null: method.lora.rank
    n_batches: int = 16  # batches the scoring gradient is averaged over...
    batch_size: int = 2  # ...of this many sequences each

    def __post_init__(self):
        in_range("fraction", self.fraction, 0, 1)
        at_least("max_params", self.max_params, 0, allow_none=True)
        one_of("score", self.score, SCORES)
        at_least("rank", self.rank, 1, allow_none=True)
        at_least("n_batches", self.n_batches, 1)
        at_least("batch_size", self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """The fine-tuning method, the weights it acts on, and every method's hyperparameters (only the
    sub-sections the chosen method uses matter)."""

    name: str = "lora"  # full | lora | lora_ga | oft | boft | unitary | hybrid | hybrid_lora | zo_fo
    # Regexes over parameter paths (e.g. "layers/attn/(q|v)_proj") the method adapts; null: the model
    # family's default (every attention and MLP projection; every parameter for full).
    targets: tuple[str, ...] | None = None
    frozen: tuple[str, ...] = ()  # regexes of paths kept frozen even if a target matches (checked first)
    lora: LoRAConfig = LoRAConfig()
    lora_ga: LoRAGAConfig = LoRAGAConfig()
    boft: BOFTConfig = BOFTConfig()
    unitary: UnitarySection = UnitarySection()
    hybrid: HybridSection = HybridSection()
    hybrid_lora: HybridLoRASection = HybridLoRASection()
    zo_fo: ZerothOrderSection = ZerothOrderSection()
    # A registered method's own hyperparameters, checked and built as its `Method.settings_type`
    # (`own_settings`): a method added outside hyjax needs no section here.
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        one_of("name", self.name, list(METHODS))
        for i, pattern in enumerate(self.targets or ()):
            valid_regex(f"targets[{i}]", pattern)
        for i, pattern in enumerate(self.frozen):
            valid_regex(f"frozen[{i}]", pattern)
        self.own_settings()
        method_of(self).check(self)

    def own_settings(self):
        """`settings` as the chosen method's `Method.settings_type` (its defaults for keys not given), or
        None for a method without settings of its own. Raises `ConfigError` naming a wrong key or value."""
        settings_type = method_of(self).settings_type
        if settings_type is None:
            if self.settings:
                raise ConfigError(f"method.settings={self.settings} is given, but method.name={self.name!r} has no "
                                  "settings of its own (its hyperparameters are in its sub-section, e.g. "
                                  "method.lora); remove method.settings")
            return None
        return build(settings_type, self.settings, "method.settings")

    def adapter_config(self):
        """The `hyjax.adapters` config object of the chosen method (e.g. `LoRAConfig(rank=16)`)."""
        return method_of(self).adapter_config(self)
