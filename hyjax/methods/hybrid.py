"""The hybrid of BOFT and LoRA-GA (`method.name: hybrid`): both branches on every target, mixed per
layer by lambdas that the `hybrid_weights` Optax transform computes from the branches' gradient norms
(see hyjax.adapters.hybrid and hyjax.optim.hybrid_weights)."""

from __future__ import annotations

from hyjax.adapters import HybridConfig
from hyjax.adapters.boft import FLAT_BLOCKS_FORM
from hyjax.adapters.hybrid import WEIGHT_MIX_FORM
from hyjax.methods.base import Method
from hyjax.optim import hybrid_weights


class Hybrid(Method):
    """Hybrid BOFT + LoRA-GA (method.boft, method.lora_ga, method.hybrid)."""

    name = "hybrid"
    from_gradients = True
    lambdas = True

    def adapter_config(self, section) -> HybridConfig:
        return HybridConfig(boft=section.boft, lora_ga=section.lora_ga, mix=section.hybrid.mix)

    def form(self, section) -> str:
        """mix="weight" mixes on the input side (one matmul with W0): runs saved with the earlier output-side
        mix would change model if resumed; and BOFT's r holds each block's entries in one axis."""
        forms = [WEIGHT_MIX_FORM] if section.hybrid.mix == "weight" else []
        return "; ".join([*forms, FLAT_BLOCKS_FORM])

    def optimizer(self, config, grouped):
        """`hybrid_weights` sets lambda from the gradients before the base optimizers see them; with
        mix="update" it wraps them instead and scales their updates by lambda."""
        hw = config.train.hybrid_weights
        mix = config.method.hybrid.mix
        options = dict(direction=hw.direction, temperature=hw.temperature, ema=hw.ema, clip=tuple(hw.clip),
                       warmup_steps=hw.warmup_steps, mix=mix, share_correction=hw.share_correction)
        if mix == "update":
            return [hybrid_weights(**options, inner=grouped)]
        return [hybrid_weights(**options), grouped]
