"""The hybrid of BOFT and LoRA-GA (`method.name: hybrid`): both branches on every target, mixed per
layer by lambdas that the `hybrid_weights` Optax transform computes from the branches' gradient norms
(see hyjax.adapters.hybrid and hyjax.optim.hybrid_weights)."""

from __future__ import annotations

from hyjax.adapters import HybridConfig
from hyjax.adapters.boft import FLAT_BLOCKS_FORM
from hyjax.adapters.hybrid import WEIGHT_MIX_FORM, set_lambdas
from hyjax.methods.base import Method
from hyjax.methods.hybrid_report import lambda_heatmap, lambda_metrics
from hyjax.optim import current_lambdas, hybrid_weights
from hyjax.optim.hybrid_weights import STATE_FORM


class Hybrid(Method):
    """Hybrid BOFT + LoRA-GA (method.boft, method.lora_ga, method.hybrid)."""

    name = "hybrid"
    sections = ("boft", "lora_ga", "lora", "hybrid")

    def adapter_config(self, section) -> HybridConfig:
        return HybridConfig(boft=section.boft, lora_ga=section.lora_ga, lora=section.lora, mix=section.hybrid.mix,
                            lora_start=section.hybrid.lora_start)

    def from_gradients(self, section) -> bool:
        """LoRA-GA's start needs the gradient; the plain LoRA start (`lora_start: zero`) does not."""
        return section.hybrid.lora_start == "gradient"

    def form(self, section) -> str:
        """mix="weight" mixes on the input side (one matmul with W0): runs saved with the earlier output-side
        mix would change model if resumed; BOFT's r holds each block's entries in one axis; and the lambda
        transform's state keeps each branch's warm-up scale."""
        forms = [WEIGHT_MIX_FORM] if section.hybrid.mix == "weight" else []
        return "; ".join([*forms, FLAT_BLOCKS_FORM, STATE_FORM])

    def optimizer(self, config, grouped, total_updates):
        """`hybrid_weights` sets lambda from the gradients before the base optimizers see them; with
        mix="update" it wraps them instead and scales their updates by lambda."""
        hw = config.train.hybrid_weights
        mix = config.method.hybrid.mix
        options = dict(rule=hw.rule, direction=hw.direction, temperature=hw.temperature, ema=hw.ema,
                       clip=tuple(hw.clip), warmup_steps=hw.warmup_steps, mix=mix,
                       share_correction=hw.share_correction, shares=hw.shares,
                       handover=None if hw.handover is None else tuple(hw.handover), total_steps=total_updates)
        if mix == "update":
            return [hybrid_weights(**options, inner=grouped)]
        return [hybrid_weights(**options), grouped]

    def forward_state(self, opt_state):
        """The per-layer lambdas, which `hybrid_weights` keeps in the optimizer state."""
        return current_lambdas(opt_state)

    def with_forward_state(self, params, forward_state):
        return set_lambdas(params, forward_state)

    def logged(self, forward_state):
        """lambda of every layer of every hybrid weight, with its mean and spread over the layers."""
        return lambda_metrics(forward_state)

    def figures(self, forward_state, output_dir):
        return {"lambda_heatmap": str(lambda_heatmap(forward_state, f"{output_dir}/lambda_heatmap.png"))}
