"""The registry of fine-tuning methods: one `Method` per `method.name`.

Adding a method: an adapter module under hyjax/adapters/, a `Method` subclass overriding what differs
from a plain adapter method (hyjax/methods/), its line here (or `register(method)` from your own
code) and configs/methods/<name>.yaml.
"""

from __future__ import annotations

from hyjax.methods.base import Method
from hyjax.methods.hybrid import Hybrid
from hyjax.methods.hybrid_lora import HybridLoRA
from hyjax.methods.plain import BOFT, OFT, Full, LoRA, LoRAGA, Unitary
from hyjax.methods.zo_fo import ZerothOrderFirstOrder

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Makes `method` a `method.name` of every config built from now on (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already ({METHODS[method.name]!r})")
    METHODS[method.name] = method
    return method


for _method in (Full(), LoRA(), LoRAGA(), OFT(), BOFT(), Unitary(), Hybrid(), HybridLoRA(), ZerothOrderFirstOrder()):
    register(_method)


def method_of(config) -> Method:
    """The `Method` of a `RunConfig` or of its `method` section."""
    section = getattr(config, "method", config)
    return METHODS[section.name]
