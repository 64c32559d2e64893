"""Hybrid-LoRA's choice of fully fine-tuned modules for a run: scored from the start-up gradient
estimate, or read back from the run's checkpoint (so a resumed run keeps its modules, and the state's
structure, whatever the data order or mesh), and turned into the run's adapter spec.

The planner has no gradients; `planned_selection` assumes the budget's count of modules, taken in path
order, which is what the memory of a step depends on.
"""

from __future__ import annotations

import math

import numpy as np

from hyjax.adapters import AdapterSpec, Selection, module_scores, select_modules, selective_spec
from hyjax.adapters.targets import iter_paths

SELECTION_FILE = "module_selection.json"


def module_sizes(gradients: dict) -> dict[str, int]:
    """`{path: d_in * d_out}`: the parameters of one module of each target, from its gradient's shape."""
    return {path: math.prod(gradient.shape[-2:]) for path, gradient in iter_paths(gradients)}


def score_rank(method) -> int:
    """The rank r whose residual energy the scores measure (`method.hybrid_lora.rank`, else LoRA's)."""
    return method.hybrid_lora.rank or method.lora.rank


def choose_modules(method, gradients: dict, sizes: dict[str, int]) -> Selection:
    """Scores every module from `gradients` and picks the fully fine-tuned ones within the budget."""
    section = method.hybrid_lora
    rank = score_rank(method)
    scores = module_scores(gradients, rank, section.score)
    chosen = select_modules(scores, sizes, fraction=section.fraction, max_params=section.max_params)
    return Selection.build(scores, sizes, chosen, section.score, rank)


def planned_selection(method, adapted_shapes: dict, num_layers: int) -> Selection:
    """A selection of the budget's size for an (abstract) adapted tree of the method's LoRA, without
    gradients: equal scores, so modules are taken in path order."""
    from hyjax.adapters.node import AdaptedWeight
    from hyjax.adapters.targets import stacked_axes

    sizes = {path: math.prod(leaf.base.shape[-2:]) for path, leaf in iter_paths(adapted_shapes)
             if isinstance(leaf, AdaptedWeight)}
    scores = {path: np.ones(num_layers if stacked_axes(path) else 1) for path in sizes}
    section = method.hybrid_lora
    chosen = select_modules(scores, sizes, fraction=section.fraction, max_params=section.max_params)
    return Selection.build(scores, sizes, chosen, "planned", score_rank(method))


def selection_spec(method, selection: Selection, num_layers: int) -> AdapterSpec:
    """The adapter spec of a selection: its chosen layers fully trained, `method.lora` on the rest of
    the targets it scored."""
    return selective_spec(selection.chosen_layers(), method.lora, num_layers)
