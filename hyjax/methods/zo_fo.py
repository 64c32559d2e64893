"""The zeroth-order + first-order hybrid (`method.name: zo_fo`): base weights trained by two-point
SPSA (hyjax.optim.zeroth_order), a first-order adapter (`method.zo_fo.adapter`) by backprop, at the
same point each step, each with its own learning rate."""

from __future__ import annotations

import dataclasses

from hyjax.methods.base import Method
from hyjax.methods.plain import BOFT, OFT, LoRA, Unitary
from hyjax.optim.schedule import learning_rate_schedule
from hyjax.optim.zeroth_order import ZerothOrder


class ZerothOrderFirstOrder(Method):
    """Zeroth-order SPSA on the base weights + a first-order adapter (method.zo_fo)."""

    name = "zo_fo"
    sections = ("zo_fo", "lora", "boft", "unitary")  # its own and those of the adapters it can carry
    # The first-order adapters it can carry (`method.zo_fo.adapter`): methods that need no gradient at the start.
    ADAPTERS = {method.name: method for method in (LoRA(), OFT(), BOFT(), Unitary())}

    def _adapter_method(self, section) -> Method:
        return self.ADAPTERS[section.zo_fo.adapter]

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
