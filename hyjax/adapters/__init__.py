"""Adapters as pure transforms of parameter trees: targeted weights become `AdaptedWeight` nodes."""

from hyjax.adapters.api import (
    AdapterSpec,
    apply,
    combine,
    count_trainable,
    merge,
    split_trainable,
    starting_values,
    unmerge,
    with_rng,
)
from hyjax.adapters.boft import BOFTConfig, BOFTWeight, cayley
from hyjax.adapters.full import FullConfig, FullWeight
from hyjax.adapters.hybrid import HybridConfig, HybridWeight, set_lambdas
from hyjax.adapters.lora import LoRAConfig, LoRAWeight
from hyjax.adapters.lora_ga import LoRAGAConfig, LoRAGAWeight, estimate_gradients
from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.selective import SelectiveConfig, SelectiveWeight, selective_spec
from hyjax.adapters.unitary import UnitaryConfig, UnitaryWeight, UnitVectors
from hyjax.adapters.unitary_full import Orthogonal, UnitaryFullWeight
from hyjax.adapters.peft_io import export_merged, export_peft, import_peft
from hyjax.adapters.gguf_lora import export_gguf_lora

__all__ = [
    "BOFTConfig", "BOFTWeight", "cayley", "export_gguf_lora", "export_merged", "export_peft", "import_peft",
    "AdaptedWeight", "AdapterSpec", "FullConfig", "FullWeight", "LoRAConfig", "LoRAWeight", "apply", "combine",
    "count_trainable", "merge", "split_trainable", "starting_values", "unmerge", "with_rng",
    "HybridConfig", "HybridWeight", "LoRAGAConfig", "LoRAGAWeight", "estimate_gradients", "set_lambdas",
    "Orthogonal", "UnitaryConfig", "UnitaryFullWeight", "UnitaryWeight", "UnitVectors",
    "SelectiveConfig", "SelectiveWeight", "selective_spec",
]
