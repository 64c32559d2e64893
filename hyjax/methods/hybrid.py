"""The hybrid of BOFT and LoRA-GA (`method.name: hybrid`): both branches on every target, mixed per
layer by lambdas that the `hybrid_weights` Optax transform computes from the branches' gradient norms
(see hyjax.adapters.hybrid and hyjax.optim.hybrid_weights)."""

from __future__ import annotations

import dataclasses

from hyjax.adapters import HybridConfig
from hyjax.adapters.boft import FLAT_BLOCKS_FORM
from hyjax.adapters.hybrid import LORA_STARTS, MIXES, WEIGHT_MIX_FORM, set_lambdas
from hyjax.methods.base import Method
from hyjax.methods.hybrid_report import lambda_heatmap, lambda_metrics
from hyjax.optim import current_lambdas, hybrid_weights
from hyjax.optim.hybrid_weights import DIRECTIONS, RULES, SHARES, STATE_FORM
from hyjax.validation import at_least, in_range, one_of


@dataclasses.dataclass(frozen=True)
class LambdaSection:
    """`method.hybrid.lambdas`: how the `hybrid_weights` Optax transform (hyjax.optim.hybrid_weights) sets
    each hybrid layer's lambda; its `mix` is `method.hybrid.mix`."""

    rule: str = "normalized"  # normalized: each branch's gradient norm over its own warm-up mean | raw
    direction: str = "proportional"  # proportional: the branch with the larger signal gets more | inverse
    temperature: float = 1.0  # tau > 0 of the norm ratio
    ema: float = 0.9  # beta in [0, 1) of the moving average of the target share
    clip: tuple[float, float] = (0.05, 0.95)  # [lo, hi] within [0, 1]
    warmup_steps: int = 10  # lambda stays at the prior for this many steps (the normalized rule's scales)
    share_correction: bool | None = None  # divide each branch's norm by its share; null: when mix=weight
    shares: str = "unit"  # mix=update: branch updates x 2 lam, 2 (1 - lam) (unit) | x lam, 1 - lam (sum)
    handover: tuple[float, float] | None = None  # prior lambda from [first, last] over the run; null: 0.5

    def __post_init__(self):
        one_of("rule", self.rule, RULES)
        one_of("shares", self.shares, SHARES)
        one_of("direction", self.direction, DIRECTIONS)
        if self.handover is not None and not (len(self.handover) == 2 and all(0 < p < 1 for p in self.handover)):
            raise ValueError(f"handover={list(self.handover)} must be [first, last], two lambdas strictly between "
                             "0 and 1, or null")
        if self.rule == "normalized" and self.warmup_steps < 1:
            raise ValueError("warmup_steps=0: the normalized rule measures each branch's scale over the warm-up "
                             "steps, so it needs at least 1 (or rule: raw)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        in_range("ema", self.ema, 0, 1, high_open=True)
        lo, hi = self.clip
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"clip={list(self.clip)} must satisfy 0 <= lo <= hi <= 1")
        at_least("warmup_steps", self.warmup_steps, 0)


@dataclasses.dataclass(frozen=True)
class HybridSection:
    """`method.hybrid`: the hybrid BOFT + LoRA-GA method; its branches are `method.boft` and `method.lora_ga`."""

    mix: str = "weight"  # weight: lambda weights the branch outputs | update: lambda scales their updates
    # gradient: the LoRA branch is LoRA-GA (method.lora_ga) | zero: plain LoRA (method.lora; B = 0), a control
    lora_start: str = "gradient"
    lambdas: LambdaSection = LambdaSection()

    def __post_init__(self):
        one_of("mix", self.mix, MIXES)
        one_of("lora_start", self.lora_start, LORA_STARTS)


class Hybrid(Method):
    """Hybrid BOFT + LoRA-GA (method.boft, method.lora_ga, method.hybrid)."""

    name = "hybrid"
    sections = ("boft", "lora_ga", "lora", "hybrid")
    section_types = {"hybrid": HybridSection}
    moved_settings = {"train.hybrid_weights": "method.hybrid.lambdas"}

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
        hw = config.method.hybrid.lambdas
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
