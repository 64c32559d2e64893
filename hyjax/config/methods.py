"""The `method` section: which adapter method, where, and its hyperparameters; `to_adapter_spec()`.

Sub-sections are the adapters' own config dataclasses (`hyjax.adapters.LoRAConfig`, ...), so their
fields, defaults and validation are the adapters'. The exception is `unitary`: `UnitaryConfig` asks JAX
for its backend when built, which must not happen before `jax.distributed.initialize`, so the section
mirrors its fields (a test keeps the two in step) and builds the real one in `to_adapter_spec()`.

Adding a method (e.g. zo_fo once `hyjax.adapters` has it): give MethodSection a sub-section field for its
hyperparameters, register a `Method` in METHODS, add configs/methods/<name>.yaml and its base.yaml block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from hyjax.adapters import AdapterSpec, BOFTConfig, FullConfig, HybridConfig, LoRAConfig, LoRAGAConfig
from hyjax.adapters.hybrid import MIXES
from hyjax.config.sections import one_of, valid_regex


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
}


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """The fine-tuning method, the weights it acts on, and every method's hyperparameters (only the
    sub-sections the chosen method uses matter)."""

    name: str = "lora"  # full | lora | lora_ga | oft | boft | unitary | hybrid
    # Regexes over parameter paths (e.g. "layers/attn/(q|v)_proj") the method adapts; null: the model
    # family's default (every attention and MLP projection; every parameter for full).
    targets: tuple[str, ...] | None = None
    frozen: tuple[str, ...] = ()  # regexes of paths kept frozen even if a target matches (checked first)
    lora: LoRAConfig = LoRAConfig()
    lora_ga: LoRAGAConfig = LoRAGAConfig()
    boft: BOFTConfig = BOFTConfig()
    unitary: UnitarySection = UnitarySection()
    hybrid: HybridSection = HybridSection()

    def __post_init__(self):
        one_of("name", self.name, list(METHODS))
        for i, pattern in enumerate(self.targets or ()):
            valid_regex(f"targets[{i}]", pattern)
        for i, pattern in enumerate(self.frozen):
            valid_regex(f"frozen[{i}]", pattern)
        if self.name == "oft":
            _oft(self)

    def adapter_config(self):
        """The `hyjax.adapters` config object of the chosen method (e.g. `LoRAConfig(rank=16)`)."""
        return METHODS[self.name].build(self)

    def to_adapter_spec(self, family: str = "llama") -> AdapterSpec:
        """`AdapterSpec.for_method(<method config>, targets=..., frozen=...)` for `hyjax.adapters.apply`."""
        targets = list(self.targets) if self.targets is not None else None
        return AdapterSpec.for_method(self.adapter_config(), targets=targets, frozen=list(self.frozen),
                                      family=family)

    @property
    def from_gradients(self) -> bool:
        """Whether the method initialises from gradients of the pretrained model (LoRA-GA, the hybrid)."""
        return self.name in ("lora_ga", "hybrid")

    @property
    def peft_exportable(self) -> bool:
        """Whether Hugging Face PEFT can hold this method's adapters (else export merged)."""
        return METHODS[self.name].peft(self)
