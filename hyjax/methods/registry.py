"""The registry of fine-tuning methods: one `Method` per `method.name`.

Adding a method: an adapter module under hyjax/adapters/, one entry here (a `Method` subclass
overriding what differs from a plain adapter method), configs/methods/<name>.yaml and its block in
configs/base.yaml.
"""

from __future__ import annotations

from hyjax.methods.base import Method
from hyjax.methods.hybrid import Hybrid
from hyjax.methods.hybrid_lora import HybridLoRA
from hyjax.methods.plain import BOFT, OFT, Full, LoRA, LoRAGA, Unitary
from hyjax.methods.zo_fo import ZerothOrderFirstOrder

METHODS: dict[str, Method] = {method.name: method for method in (
    Full(), LoRA(), LoRAGA(), OFT(), BOFT(), Unitary(), Hybrid(), HybridLoRA(), ZerothOrderFirstOrder())}


def method_of(config) -> Method:
    """The `Method` of a `RunConfig` or of its `method` section."""
    section = getattr(config, "method", config)
    return METHODS[section.name]
