"""Hybrid-LoRA (`method.name: hybrid_lora`): score each module from its full gradient, train the best
fully (`hyjax.adapters.SelectiveWeight`), LoRA on the rest.

A module is one projection of one layer (layer 3's q_proj). Its score comes from the full weight
gradient G averaged over a few batches (`estimate_gradients`), with singular values s_i of G and
r the LoRA rank:

    grad_norm             ||G||_F = sqrt(sum_i s_i^2)
    residual_share        sum_{i>r} s_i^2 / sum_i s_i^2     the share of gradient energy outside rank r
    residual_norm         ||G - G_r||_F = sqrt(sum_{i>r} s_i^2)
    grad_norm_x_residual  ||G||_F * residual_share          (default) the energy a rank-r adapter misses
    random                uniform in [0, 1), drawn from train.seed: the same number of modules chosen at
                          random (the baseline the scores must beat; G only gives the modules' sizes)

`select_modules` trains the top-scored modules fully within a budget (a share of the modules or a
number of parameters); `Selection` records the scores and the choice for the log and the checkpoint,
so a resumed run keeps its modules (and the state's structure) whatever the data order or mesh. The
planner has no gradients: `planned_selection` fills the budget with the largest modules (or the planner
reads a run's `module_selection.json`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from hyjax.adapters import AdaptedWeight, AdapterSpec, apply, selective_spec
from hyjax.adapters.lora_ga import randomized_svd
from hyjax.adapters.targets import iter_paths, stacked_axes
from hyjax.methods.base import Method
from hyjax.model import abstract_params
from hyjax.validation import at_least, in_range, one_of

SCORES = ("grad_norm_x_residual", "grad_norm", "residual_share", "residual_norm", "random")
EXACT_SVD_LIMIT = 4096  # matrices whose smaller side is larger get a randomized SVD


def module_scores(gradients: dict, rank: int, score: str = "grad_norm_x_residual", *,
                  exact_limit: int = EXACT_SVD_LIMIT, key: jax.Array | None = None,
                  iterations: int = 4) -> dict[str, np.ndarray]:
    """`{path: scores [L]}` for gradients `{path: [L, d_in, d_out] or [d_in, d_out]}` (nested by path,
    as `estimate_gradients` returns them); an unstacked weight gives one score (layer 0).

    Singular values are computed in float32: exactly for matrices whose smaller side is at most
    `exact_limit`; above it the top-r energy comes from `randomized_svd` (q = 2r + 10 columns,
    `iterations` power iterations, `key`), an estimate that is a lower bound of the true top-r energy,
    so residual-based scores are then slightly overestimated. Compiled once per gradient shape.
    `score="random"`: uniform scores from `key` (folded with the path's index), no SVD.
    """
    if score not in SCORES:
        raise ValueError(f"unknown module score {score!r}; choose one of {SCORES}")
    if rank < 1:
        raise ValueError(f"module scores need the LoRA rank >= 1, got rank={rank}")
    key = jax.random.key(0) if key is None else key
    scores = {}
    for index, (path, gradient) in enumerate(iter_paths(gradients)):
        if gradient.ndim not in (2, 3):
            raise ValueError(f"gradient of {path} has shape {gradient.shape}; module scores need [d_in, d_out] or "
                             "[layers, d_in, d_out] gradients")
        stacked = gradient.reshape((-1,) + gradient.shape[-2:])
        if score == "random":
            scores[path] = np.asarray(jax.random.uniform(jax.random.fold_in(key, index), (stacked.shape[0],)),
                                      np.float64)
            continue
        exact = min(gradient.shape[-2:]) <= exact_limit
        total, residual = _energies(stacked, jax.random.fold_in(key, index), rank, exact, iterations)
        scores[path] = _score(score, _on_host(total), _on_host(residual))
    return scores


def _on_host(x: jax.Array) -> np.ndarray:
    """A small result as float64 numpy, gathered from every process when it is split across hosts."""
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, np.float64)


def _score(score: str, total: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """A score per matrix from its gradient energy `sum_i s_i^2` and residual energy `sum_{i>r} s_i^2`."""
    share = np.divide(residual, total, out=np.zeros_like(total), where=total > 0)
    return {"grad_norm": np.sqrt(total), "residual_share": share, "residual_norm": np.sqrt(residual),
            "grad_norm_x_residual": np.sqrt(total) * share}[score]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _energies(gradients: jax.Array, key: jax.Array, rank: int, exact: bool, iterations: int):
    """`(sum_i s_i^2, sum_{i>r} s_i^2)` of each `[d_in, d_out]` matrix of `gradients [n, d_in, d_out]`,
    one matrix at a time (bounded memory). The exact residual sums the trailing singular values (no
    cancellation: a rank-r gradient's is ~0, where `total - top` in float32 leaves ~1e-7 of the total);
    the randomized one, knowing only the top values, is `max(total - top, 0)`."""
    def energies(g):
        g = g.astype(jnp.float32)
        total = jnp.sum(g * g)
        if exact:
            s = jnp.linalg.svd(g, compute_uv=False)
            return total, jnp.sum(jnp.square(s[rank:]))
        _, s, _ = randomized_svd(g, min(2 * rank + 10, *g.shape), iterations, key)
        return total, jnp.maximum(total - jnp.sum(jnp.square(s[:rank])), 0.0)

    return jax.lax.map(energies, gradients)


# ------------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class ScoredModule:
    """One module: its weight's path, its layer (0 for an unstacked weight), score, size, and whether
    it is trained fully."""

    path: str
    layer: int
    score: float
    params: int
    chosen: bool


def select_modules(scores: Mapping[str, np.ndarray], module_params: Mapping[str, int], fraction: float = 0.1,
                   max_params: int | None = None) -> dict[str, tuple[int, ...]]:
    """`{path: chosen layers}` (every path, sorted layers): the modules to train fully.

    `scores`: `module_scores`; `module_params`: parameters of one module of each path (d_in * d_out).
    Budget: the top `floor(fraction * modules)` modules (at least one when fraction > 0); with
    `max_params` instead (the fraction is then ignored), modules in descending score order while they fit
    in what is left of the budget (one that does not fit is skipped). Ties: path, then layer order.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction} of modules to train fully must be in [0, 1]")
    if max_params is not None and max_params < 0:
        raise ValueError(f"max_params={max_params} (parameters to train fully) must be >= 0")
    missing = sorted(set(scores) - set(module_params))
    if missing:
        raise ValueError(f"module_params lacks the sizes of {missing}; give d_in * d_out for every scored path")
    modules = []
    for path in sorted(scores):
        for layer, value in enumerate(np.atleast_1d(np.asarray(scores[path], np.float64))):
            if not math.isfinite(value):
                raise ValueError(f"score of {path} layer {layer} is {value}; are its gradients finite?")
            modules.append((-value, path, layer))
    modules.sort()
    chosen: dict[str, list[int]] = {path: [] for path in scores}
    if max_params is None:
        count = max(1, math.floor(fraction * len(modules))) if fraction > 0 else 0
        for _, path, layer in modules[:count]:
            chosen[path].append(layer)
    else:
        left = max_params
        for _, path, layer in modules:
            if module_params[path] <= left:
                chosen[path].append(layer)
                left -= module_params[path]
    return {path: tuple(sorted(layers)) for path, layers in chosen.items()}


@dataclasses.dataclass(frozen=True)
class Selection:
    """Every module's score and whether it is trained fully, under one score kind and LoRA rank."""

    score: str
    rank: int
    modules: tuple[ScoredModule, ...]

    @classmethod
    def build(cls, scores: Mapping[str, np.ndarray], module_params: Mapping[str, int],
              chosen: Mapping[str, tuple[int, ...]], score: str, rank: int) -> "Selection":
        """The record of `module_scores` and `select_modules`' choice."""
        return cls(score, rank, tuple(
            ScoredModule(path, layer, float(value), int(module_params[path]), layer in chosen.get(path, ()))
            for path in sorted(scores) for layer, value in enumerate(np.atleast_1d(scores[path]))))

    def chosen_layers(self) -> dict[str, tuple[int, ...]]:
        """`{path: chosen layers}` for every path, as `select_modules` returns it."""
        out: dict[str, list[int]] = {}
        for m in self.modules:
            out.setdefault(m.path, [])
            if m.chosen:
                out[m.path].append(m.layer)
        return {path: tuple(sorted(layers)) for path, layers in out.items()}

    def to_json(self) -> dict:
        """Plain dicts and lists (for checkpoint metadata and `module_selection.json`)."""
        return {"score": self.score, "rank": self.rank, "modules": [dataclasses.asdict(m) for m in self.modules]}

    @classmethod
    def from_json(cls, data: dict) -> "Selection":
        return cls(data["score"], int(data["rank"]), tuple(ScoredModule(**m) for m in data["modules"]))

    def table(self, top: int = 10) -> str:
        """A few lines for the log: how much is trained fully, and the `top` modules by score."""
        chosen = [m for m in self.modules if m.chosen]
        full, total = sum(m.params for m in chosen), sum(m.params for m in self.modules)
        lines = [f"Hybrid-LoRA: {len(chosen)} of {len(self.modules)} modules trained fully, {full:,} of {total:,} "
                 f"target parameters ({100 * full / max(total, 1):.1f}%); score {self.score}, LoRA rank {self.rank}",
                 f"  {'module':<32} {'score':>11} {'params':>12}  full"]
        for m in sorted(self.modules, key=lambda m: (-m.score, m.path, m.layer))[:top]:
            name = f"{m.path}[{m.layer}]"
            lines.append(f"  {name:<32} {m.score:>11.4g} {m.params:>12,}  {'yes' if m.chosen else ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- the method

def module_sizes(gradients: dict) -> dict[str, int]:
    """`{path: d_in * d_out}`: the parameters of one module of each target, from its gradient's shape."""
    return {path: math.prod(gradient.shape[-2:]) for path, gradient in iter_paths(gradients)}


@dataclasses.dataclass(frozen=True)
class HybridLoRASection:
    """`method.hybrid_lora`: a scoring pass over the pretrained model picks the target modules (one
    projection of one layer each) to fine-tune fully; the rest get LoRA (method.lora). See
    `module_scores`."""

    fraction: float = 0.1  # share of the target modules fully fine-tuned (rounded down, at least one)
    max_params: int | None = None  # instead of fraction: fully fine-tuned parameters at most (best modules that fit)
    score: str = "grad_norm_x_residual"  # grad_norm_x_residual | grad_norm | residual_share | residual_norm | random
    rank: int | None = None  # r of the residual energy (outside the best rank-r approximation); null: method.lora.rank
    n_batches: int = 16  # batches the scoring gradient is averaged over...
    batch_size: int = 2  # ...of this many sequences each

    def __post_init__(self):
        in_range("fraction", self.fraction, 0, 1)
        at_least("max_params", self.max_params, 0, allow_none=True)
        one_of("score", self.score, SCORES)
        at_least("rank", self.rank, 1, allow_none=True)
        at_least("n_batches", self.n_batches, 1)
        at_least("batch_size", self.batch_size, 1)


class HybridLoRA(Method):
    """Hybrid-LoRA: the best-scored modules fully fine-tuned, LoRA (method.lora) on the rest
    (method.hybrid_lora)."""

    name = "hybrid_lora"
    sections = ("hybrid_lora", "lora")
    section_types = {"hybrid_lora": HybridLoRASection}
    starts_from_gradients = True
    SELECTION_KEY = "module_selection"

    def adapter_config(self, section):
        """LoRA, on the targets it scores (`adapter_spec` places the fully trained modules)."""
        return section.lora

    def gradient_batches(self, section) -> tuple[int, int]:
        return section.hybrid_lora.n_batches, section.hybrid_lora.batch_size

    def peft_exportable(self, section) -> bool:
        return True  # LoRA, with the fully trained modules in modules_to_save

    @staticmethod
    def score_rank(section) -> int:
        """The rank r whose residual energy the scores measure (`hybrid_lora.rank`, else LoRA's)."""
        return section.hybrid_lora.rank or section.lora.rank

    def select(self, config, gradients: dict) -> Selection:
        """Scores every module from `gradients` and picks the fully trained ones within the budget."""
        section = config.method
        budget = section.hybrid_lora
        rank = self.score_rank(section)
        sizes = module_sizes(gradients)
        draw = jax.random.key(config.train.seed) if budget.score == "random" else None
        scores = module_scores(gradients, rank, budget.score, key=draw)
        chosen = select_modules(scores, sizes, fraction=budget.fraction, max_params=budget.max_params)
        return Selection.build(scores, sizes, chosen, budget.score, rank)

    def planned_selection(self, config, model_config) -> Selection:
        """The budget filled at its worst case for memory, without gradients: each module scored by its
        size, so the largest modules (the MLP projections, under grouped-query attention several times
        k_proj's size) are trained fully first. Under `fraction` no choice of as many modules trains more;
        under `max_params` a choice trains at most the budget, which this fills largest-first."""
        lora = super().adapter_spec(config, model_config)
        adapted = jax.eval_shape(lambda p: apply(lora, p, jax.random.key(0)), abstract_params(model_config))
        sizes = {path: math.prod(leaf.base.shape[-2:]) for path, leaf in iter_paths(adapted)
                 if isinstance(leaf, AdaptedWeight)}
        scores = {path: np.full(model_config.num_layers if stacked_axes(path) else 1, float(size))
                  for path, size in sizes.items()}
        budget = config.method.hybrid_lora
        chosen = select_modules(scores, sizes, fraction=budget.fraction, max_params=budget.max_params)
        return Selection.build(scores, sizes, chosen, "largest", self.score_rank(config.method))

    def selection_from_json(self, data: dict) -> Selection:
        return Selection.from_json(data)

    def adapter_spec(self, config, model_config=None, selection: Selection | None = None) -> AdapterSpec:
        """The chosen layers fully trained, `method.lora` on the rest of the targets it scored (without
        a selection: LoRA on every target, the tree the scoring gradient is taken for)."""
        if selection is None:
            return super().adapter_spec(config, model_config)
        return selective_spec(selection.chosen_layers(), config.method.lora, model_config.num_layers)
