"""The zeroth-order + first-order hybrid (`method.name: zo_fo`): base weights trained by two-point
SPSA (hyjax.optim.zeroth_order), a first-order adapter (`method.zo_fo.adapter`) by backprop, at the
same point each step, each with its own learning rate."""

from __future__ import annotations

import dataclasses

from hyjax.methods.base import Method
from hyjax.methods.plain import BOFT, OFT, LoRA, Unitary
from hyjax.optim.schedule import learning_rate_schedule
from hyjax.optim.zeroth_order import ZerothOrder
from hyjax.validation import at_least, one_of, valid_regex

# The first-order adapters zo_fo can carry (`method.zo_fo.adapter`): methods that need no gradient at the start.
ADAPTERS = {method.name: method for method in (LoRA(), OFT(), BOFT(), Unitary())}


@dataclasses.dataclass(frozen=True)
class ZerothOrderSection:
    """`method.zo_fo`: base weights trained by two-point SPSA (MeZO), an adapter by backprop, at the same
    point each step (see hyjax.optim.zeroth_order)."""

    adapter: str = "lora"  # the first-order adapter: lora | oft | boft | unitary (its own sub-section)
    learning_rate: float = 1e-6  # peak learning rate of the SPSA updates (train.learning_rate: the adapter's)
    mu: float = 1e-3  # perturbation scale
    directions: int = 1  # SPSA directions averaged per step, two forward passes each
    weight_decay: float = 0.0  # decoupled weight decay of the SPSA-trained weights
    targets: tuple[str, ...] = (".*",)  # regexes over weight paths trained by SPSA (default: every weight)

    def __post_init__(self):
        one_of("adapter", self.adapter, list(ADAPTERS))
        for name in ("learning_rate", "mu"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        at_least("directions", self.directions, 1)
        at_least("weight_decay", self.weight_decay, 0)
        if not self.targets:
            raise ValueError("targets is empty: give at least one regex of weights to train by SPSA, e.g. ['.*']")
        for i, pattern in enumerate(self.targets):
            valid_regex(f"targets[{i}]", pattern)


class ZerothOrderFirstOrder(Method):
    """Zeroth-order SPSA on the base weights + a first-order adapter (method.zo_fo)."""

    name = "zo_fo"
    sections = ("zo_fo", "lora", "boft", "unitary")  # its own and those of the adapters it can carry
    section_types = {"zo_fo": ZerothOrderSection}

    def _adapter_method(self, section) -> Method:
        return ADAPTERS[section.zo_fo.adapter]

    def adapter_config(self, section):
        return self._adapter_method(section).adapter_config(section)

    def check(self, section) -> None:
        self._adapter_method(section).check(section)

    def form(self, section) -> str | None:
        return self._adapter_method(section).form(section)

    def optimizer_groups(self, config, schedule):
        return self._adapter_method(config.method).optimizer_groups(config, schedule)

    def group_of(self, section, node):
        return self._adapter_method(section).group_of(section, node)

    def own_weights(self, config, total_steps: int) -> ZerothOrder:
        """The SPSA part; its learning rate follows `train`'s schedule (warmup, decay) scaled to
        `method.zo_fo.learning_rate`."""
        section = config.method.zo_fo
        train = dataclasses.replace(config.train, learning_rate=section.learning_rate)
        return ZerothOrder(targets=tuple(section.targets), mu=section.mu, directions=section.directions,
                           schedule=learning_rate_schedule(train, total_steps), weight_decay=section.weight_decay)
