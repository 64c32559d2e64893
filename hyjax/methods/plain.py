"""The adapter methods that need nothing beyond their adapter: full fine-tuning, LoRA, LoRA-GA, OFT,
BOFT and the unitary adapter."""

from __future__ import annotations

import dataclasses

from hyjax.adapters import BOFTConfig, FullConfig, LoRAConfig, LoRAGAConfig, UnitaryConfig
from hyjax.adapters.boft import FLAT_BLOCKS_FORM
from hyjax.adapters.unitary_full import Orthogonal
from hyjax.methods.base import Method
from hyjax.model.config import DTYPES
from hyjax.optim.stiefel import cayley_retraction
from hyjax.optim.unit_norm import unit_norm_projection
from hyjax.validation import at_least, one_of
from pallas_kernels.dispatch import IMPLS


class Full(Method):
    """Full fine-tuning of the targets."""

    name = "full"

    def adapter_config(self, section):
        return FullConfig()


class LoRA(Method):
    """LoRA (method.lora)."""

    name = "lora"
    sections = ("lora",)
    section_types = {"lora": LoRAConfig}

    def adapter_config(self, section):
        return section.lora

    def peft_exportable(self, section) -> bool:
        return True

    def gguf_lora_exportable(self, section) -> bool:
        return True


class LoRAGA(Method):
    """LoRA-GA (method.lora_ga)."""

    name = "lora_ga"
    sections = ("lora_ga",)
    section_types = {"lora_ga": LoRAGAConfig}
    starts_from_gradients = True

    def adapter_config(self, section):
        return section.lora_ga


class BOFT(Method):
    """BOFT (method.boft)."""

    name = "boft"
    sections = ("boft",)
    section_types = {"boft": BOFTConfig}

    def adapter_config(self, section) -> BOFTConfig:
        return section.boft

    def peft_exportable(self, section) -> bool:
        return section.boft.neumann_terms == 0  # PEFT's BOFT has only the exact Cayley transform

    def form(self, section) -> str:
        """r holds each block's entries in one axis; runs saved with `[m, d_in / b, b, b]` blocks would not
        restore into it."""
        return FLAT_BLOCKS_FORM


class OFT(BOFT):
    """OFT: BOFT with n_factors=1 (method.boft)."""

    name = "oft"

    def adapter_config(self, section) -> BOFTConfig:
        if section.boft.n_factors != 1:
            raise ValueError(f"name='oft' is BOFT with one butterfly factor, but method.boft.n_factors="
                             f"{section.boft.n_factors}; set it to 1 or use name='boft'")
        return section.boft


@dataclasses.dataclass(frozen=True)
class UnitarySection:
    """`method.unitary`: `hyjax.adapters.UnitaryConfig`'s fields (see its docstring). The section mirrors
    them because `UnitaryConfig` asks JAX for its backend when built, which must not happen before
    `jax.distributed.initialize` (a test keeps the two in step); `Unitary.adapter_config` builds the real one."""

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


class Unitary(Method):
    """The uRNN-style unitary adapter (method.unitary)."""

    name = "unitary"
    sections = ("unitary",)
    section_types = {"unitary": UnitarySection}

    def adapter_config(self, section) -> UnitaryConfig:
        return UnitaryConfig(**dataclasses.asdict(section.unitary))

    def check(self, section) -> None:
        pass  # UnitaryConfig asks JAX for its backend: not before jax.distributed.initialize

    def optimizer(self, config, grouped, total_updates):
        return [grouped, unit_norm_projection()]  # reflection vectors back to unit norm after each step

    def optimizer_groups(self, config, schedule):
        """Full-capacity matrices (`Orthogonal`) move by Cayley steps on the orthogonal group."""
        return {"orthogonal": cayley_retraction(schedule)}

    def group_of(self, section, node):
        return "orthogonal" if isinstance(node, Orthogonal) else None
