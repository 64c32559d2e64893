"""The `method` section: which adapter method, where, and its hyperparameters; `to_adapter_spec()`.

Sub-sections are the adapters' own config dataclasses (`hyjax.adapters.LoRAConfig`, ...), so their
fields, defaults and validation are the adapters'. The exception is `unitary`: `UnitaryConfig` asks JAX
for its backend when built, which must not happen before `jax.distributed.initialize`, so the section
mirrors its fields (a test keeps the two in step) and builds the real one in `to_adapter_spec()`.

Adding a method: give MethodSection a sub-section field for its hyperparameters, register a `Method` in
METHODS, add configs/methods/<name>.yaml and its base.yaml block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from hyjax.adapters import AdapterSpec, BOFTConfig, FullConfig, HybridConfig, LoRAConfig, LoRAGAConfig
from hyjax.adapters.module_scores import SCORES
from hyjax.adapters.hybrid import MIXES
from hyjax.config.sections import at_least, in_range, one_of, valid_regex


@dataclasses.dataclass(frozen=True)
class UnitarySection:
    """`hyjax.adapters.UnitaryConfig`'s fields (see its docstring)."""

    impl: str = "auto"  # auto (Pallas on TPU/GPU, XLA on CPU) | xla | pallas
    full_capacity: bool = False  # a dense d_in x d_in orthogonal matrix instead (small d_in only)
    max_full_capacity_dim: int = 1024  # full_capacity is refused above this d_in
    perm_seed: int = 0  # seed of the fixed permutation Pi
    dtype: str = "float32"  # dtype of the trainable parameters

    def __post_init__(self):
        one_of("impl", self.impl, ("auto", "xla", "pallas"))
        if self.max_full_capacity_dim < 1:
            raise ValueError(f"max_full_capacity_dim={self.max_full_capacity_dim} must be >= 1")


@dataclasses.dataclass(frozen=True)
class HybridSection:
    """The hybrid BOFT + LoRA-GA method: its branches are `method.boft` and `method.lora_ga`."""

    mix: str = "weight"  # weight: lambda weights the branch outputs | update: lambda scales their updates

    def __post_init__(self):
        one_of("mix", self.mix, MIXES)


# The first-order adapters the ZO + FO hybrid can carry (methods that need no gradient at the start).
ZO_FO_ADAPTERS = ("lora", "oft", "boft", "unitary")


@dataclasses.dataclass(frozen=True)
class ZerothOrderSection:
    """The ZO + FO hybrid: base weights trained by two-point SPSA (MeZO), an adapter by backprop, at
    the same point each step (see hyjax.training.zeroth_order)."""

    adapter: str = "lora"  # the first-order adapter: lora | oft | boft | unitary (its own sub-section)
    learning_rate: float = 1e-6  # peak learning rate of the SPSA updates (train.learning_rate: the adapter's)
    mu: float = 1e-3  # perturbation scale
    directions: int = 1  # SPSA directions averaged per step, two forward passes each
    weight_decay: float = 0.0  # decoupled weight decay of the SPSA-trained weights
    targets: tuple[str, ...] = (".*",)  # regexes over weight paths trained by SPSA (default: every weight)

    def __post_init__(self):
        one_of("adapter", self.adapter, ZO_FO_ADAPTERS)
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
    hyjax.adapters.module_scores."""

    fraction: float = 0.1  # share of the target modules fully fine-tuned (rounded down, at least one)
    max_params: int | None = None  # instead of fraction: fully fine-tuned parameters at most (best modules that fit)
    score: str = "grad_norm_x_residual"  # grad_norm_x_residual | grad_norm | residual_share | residual_norm
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
class Method:
    """A registered method: how to build its adapter config from the section, whether PEFT can hold it."""

    build: Callable[["MethodSection"], Any]
    peft: Callable[["MethodSection"], bool]
    description: str


def _oft(section: "MethodSection") -> BOFTConfig:
    if section.boft.n_factors != 1:
        raise ValueError(f"name='oft' is BOFT with one butterfly factor, but method.boft.n_factors="
                         f"{section.boft.n_factors}; set it to 1 or use name='boft'")
    return section.boft


def _unitary(section: "MethodSection"):
    from hyjax.adapters import UnitaryConfig
    return UnitaryConfig(**dataclasses.asdict(section.unitary))


# Method name -> Method. Only methods that hyjax.adapters implements are listed.
METHODS: dict[str, Method] = {
    "full": Method(lambda s: FullConfig(), lambda s: False, "full fine-tuning of the targets"),
    "lora": Method(lambda s: s.lora, lambda s: True, "LoRA (method.lora)"),
    "lora_ga": Method(lambda s: s.lora_ga, lambda s: False, "LoRA-GA (method.lora_ga)"),
    "oft": Method(_oft, lambda s: s.boft.neumann_terms == 0, "OFT: BOFT with n_factors=1 (method.boft)"),
    "boft": Method(lambda s: s.boft, lambda s: s.boft.neumann_terms == 0, "BOFT (method.boft)"),
    "unitary": Method(_unitary, lambda s: False, "uRNN-style unitary adapter (method.unitary)"),
    "hybrid": Method(lambda s: HybridConfig(boft=s.boft, lora_ga=s.lora_ga, mix=s.hybrid.mix), lambda s: False,
                     "hybrid BOFT + LoRA-GA (method.boft, method.lora_ga, method.hybrid)"),
    "hybrid_lora": Method(lambda s: s.lora, lambda s: True,
                          "Hybrid-LoRA: the best-scored modules fully fine-tuned, LoRA (method.lora) on the rest "
                          "(method.hybrid_lora)"),
    "zo_fo": Method(lambda s: METHODS[s.zo_fo.adapter].build(s), lambda s: False,
                    "zeroth-order SPSA on the base weights + a first-order adapter (method.zo_fo)"),
}


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

    def __post_init__(self):
        one_of("name", self.name, list(METHODS))
        for i, pattern in enumerate(self.targets or ()):
            valid_regex(f"targets[{i}]", pattern)
        for i, pattern in enumerate(self.frozen):
            valid_regex(f"frozen[{i}]", pattern)
        if self.name == "oft" or (self.name == "zo_fo" and self.zo_fo.adapter == "oft"):
            _oft(self)

    def adapter_config(self):
        """The `hyjax.adapters` config object of the chosen method (e.g. `LoRAConfig(rank=16)`; for
        hybrid_lora the LoRA of its unchosen modules, `selective_spec` places the chosen ones)."""
        return METHODS[self.name].build(self)

    def to_adapter_spec(self, family: str = "llama") -> AdapterSpec:
        """`AdapterSpec.for_method(<method config>, targets=..., frozen=...)` for `hyjax.adapters.apply`."""
        targets = list(self.targets) if self.targets is not None else None
        return AdapterSpec.for_method(self.adapter_config(), targets=targets, frozen=list(self.frozen),
                                      family=family)

    @property
    def from_gradients(self) -> bool:
        """Whether the method starts from gradients of the pretrained model (LoRA-GA and the hybrid
        initialise from them, Hybrid-LoRA scores its modules with them)."""
        return self.name in ("lora_ga", "hybrid", "hybrid_lora")

    @property
    def gradient_batches(self) -> tuple[int, int]:
        """`(n_batches, batch_size)` of the gradient estimate a `from_gradients` method starts from."""
        section = self.hybrid_lora if self.name == "hybrid_lora" else self.lora_ga
        return section.n_batches, section.batch_size

    @property
    def peft_exportable(self) -> bool:
        """Whether Hugging Face PEFT can hold this method's adapters (else export merged)."""
        return METHODS[self.name].peft(self)
