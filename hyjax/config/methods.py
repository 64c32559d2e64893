"""The `method` section: which method (`hyjax.methods`), where, and each method's hyperparameters.

`MethodSection` holds the fields every method shares (name, targets, frozen, settings) and, as
sub-sections, the `Method.section_types` of every method registered when this module is imported
(`method.lora` is `hyjax.adapters.LoRAConfig`, `method.hybrid` is `hyjax.methods.hybrid.HybridSection`,
...), so each sub-section's fields, defaults and validation belong to the method that brings it.

Adding a method: its `Method` registered (hyjax/methods/registry.py, or `hyjax.methods.register`) and
configs/methods/<name>.yaml. A method in the registry file brings its sub-section through
`section_types`; one registered later from outside keeps its hyperparameters in `method.settings`, read
as the dataclass it names (`Method.settings_type`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hyjax.config.typed import ConfigError, build
from hyjax.methods import METHODS, method_of
from hyjax.validation import one_of, valid_regex


@dataclasses.dataclass(frozen=True)
class MethodFields:
    """The fields of the method section every method shares."""

    name: str = "lora"  # a registered method: full | lora | lora_ga | oft | boft | unitary | hybrid | ...
    # Regexes over parameter paths (e.g. "layers/attn/(q|v)_proj") the method adapts; null: the model
    # family's default (every attention and MLP projection; every parameter for full).
    targets: tuple[str, ...] | None = None
    frozen: tuple[str, ...] = ()  # regexes of paths kept frozen even if a target matches (checked first)
    # A registered method's own hyperparameters, checked and built as its `Method.settings_type`
    # (`own_settings`): a method added outside hyjax needs no sub-section.
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        one_of("name", self.name, list(METHODS))
        for i, pattern in enumerate(self.targets or ()):
            valid_regex(f"targets[{i}]", pattern)
        for i, pattern in enumerate(self.frozen):
            valid_regex(f"frozen[{i}]", pattern)
        self.own_settings()
        method_of(self).check(self)

    def own_settings(self):
        """`settings` as the chosen method's `Method.settings_type` (its defaults for keys not given), or
        None for a method without settings of its own. Raises `ConfigError` naming a wrong key or value."""
        settings_type = method_of(self).settings_type
        if settings_type is None:
            if self.settings:
                raise ConfigError(f"method.settings={self.settings} is given, but method.name={self.name!r} has no "
                                  "settings of its own (its hyperparameters are in its sub-section, e.g. "
                                  "method.lora); remove method.settings")
            return None
        return build(settings_type, self.settings, "method.settings")

    def adapter_config(self):
        """The `hyjax.adapters` config object of the chosen method (e.g. `LoRAConfig(rank=16)`)."""
        return method_of(self).adapter_config(self)


def sub_sections() -> dict[str, type]:
    """Every registered method's `section_types`, by sub-section name (a name two methods bring must be the
    same dataclass: OFT and BOFT share `method.boft`)."""
    out: dict[str, type] = {}
    for method in METHODS.values():
        for name, section_type in method.section_types.items():
            if out.setdefault(name, section_type) is not section_type:
                raise TypeError(f"method {method.name!r} brings method.{name} as {section_type.__name__}, but another "
                                f"method brings it as {out[name].__name__}")
    return out


MethodSection = dataclasses.make_dataclass(
    "MethodSection",
    [(name, section_type, dataclasses.field(default_factory=section_type))
     for name, section_type in sub_sections().items()],
    bases=(MethodFields,), frozen=True)
MethodSection.__module__ = __name__  # where pickle finds it (make_dataclass takes `module` from Python 3.12)
MethodSection.__doc__ = ("The fine-tuning method, the weights it acts on, and every registered method's "
                         "sub-section (only those the chosen method reads matter).")
