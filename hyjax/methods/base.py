"""`Method`: everything hyjax must know of one fine-tuning method, in one object.

The rest of hyjax asks the run's method (`hyjax.methods.method_of(config)`) instead of comparing its
name: which adapter it puts on the targets, whether it starts from gradients of the pretrained model,
what it adds to the optimizer (and optimizer groups of its own), what state its forward pass reads
from the optimizer (the hybrid's lambdas), which weights it trains itself beside the optimizer (zo_fo's
base weights, by SPSA), what it logs and plots, what it chooses at start-up and records in the
checkpoint (Hybrid-LoRA's modules), and how it exports.

The hooks take the whole `RunConfig` (`config`) or its `method` section (`section`); the defaults fit
a plain adapter method (LoRA, BOFT, ...): override what differs.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import optax

from hyjax.adapters import AdapterSpec


class OwnWeights(Protocol):
    """Weights a method trains itself beside the optimizer, held in `TrainState.base` (zo_fo's base
    weights, moved by SPSA: `hyjax.optim.zeroth_order.ZerothOrder`)."""

    def split(self, frozen: dict) -> tuple[Any, dict]:
        """`(own, rest)`: its weights taken out of the frozen tree (of arrays, shapes or axes)."""

    def join(self, own: Any, rest: dict) -> dict:
        """The inverse of `split`."""

    def wrap(self, update: Callable, batch_loss: Callable) -> Callable:
        """The run's `update(state, frozen, batch, key) -> (state, metrics)` extended to train its weights,
        given the objective's loss by forward passes alone, `batch_loss(trainable, frozen, opt_state,
        batch, key)` (`hyjax.training.step.forward_loss`)."""


class Method:
    """A fine-tuning method of `python -m hyjax.train` (`method.name`)."""

    name: ClassVar[str]  # method.name
    # The method sub-sections (`method.lora`, ...) whose settings it reads: they identify its runs.
    sections: ClassVar[tuple[str, ...]] = ()
    # The sub-sections it brings, by name, as the frozen dataclasses their YAML is read into (LoRA's
    # `{"lora": LoRAConfig}`); the config's `method` section holds those of every method registered
    # when hyjax.config is imported. A method added later keeps its own in `method.settings`.
    section_types: ClassVar[dict[str, type]] = {}
    # Its settings that moved since runs were saved with them, old dotted key -> new (the hybrid's lambda rule
    # from `train.hybrid_weights` to `method.hybrid.lambdas`): a config naming the old key is refused with the
    # new one, and saved runs are read with them moved (`hyjax.config.saved_tree`).
    moved_settings: ClassVar[dict[str, str]] = {}
    # Starts from the full gradient of the pretrained model, averaged over a few batches (LoRA-GA and
    # the hybrid initialise from it, Hybrid-LoRA scores its modules with it); `from_gradients` may
    # depend on the method's settings.
    starts_from_gradients: ClassVar[bool] = False
    # Its own hyperparameters, given as `method.settings` and read as this dataclass
    # (`section.own_settings()`); None: it has none. A method with settings lists "settings" in `sections`.
    settings_type: ClassVar[type | None] = None

    def adapter_config(self, section) -> Any:
        """The `hyjax.adapters` config of its adapter (e.g. `LoRAConfig(rank=16)`)."""
        raise NotImplementedError

    def check(self, section) -> None:
        """Raises ValueError for a method section this method cannot run (beyond the sub-sections' own
        checks). Called when the config is built."""
        self.adapter_config(section)

    def from_gradients(self, section) -> bool:
        """Whether a run with this method section starts from the gradient estimate."""
        return self.starts_from_gradients

    def gradient_batches(self, section) -> tuple[int, int]:
        """`(n_batches, batch_size)` of the start-up gradient estimate (`from_gradients` methods)."""
        return section.lora_ga.n_batches, section.lora_ga.batch_size

    def peft_exportable(self, section) -> bool:
        """Whether Hugging Face PEFT can hold its adapters (else the run exports the merged model)."""
        return False

    def gguf_lora_exportable(self, section) -> bool:
        """Whether a GGUF LoRA file (llama.cpp's `--lora`) can hold its adapters: plain low-rank factors
        on the base weights, nothing else trained."""
        return False

    def form(self, section) -> str | None:
        """The form of its forward pass, when that has changed since runs were first saved with it
        (recorded in run fingerprints, so a run saved with another form is refused); None otherwise."""
        return None

    def optimizer(self, config, grouped: optax.GradientTransformation,
                  total_updates: int) -> list[optax.GradientTransformation]:
        """Its part of the optimizer chain, after one-norm gradient clipping: `grouped` (the per-group
        base optimizers, each group clipped first under `train.grad_clip_per_group`) with whatever the
        method adds around it. `total_updates`: the optimizer updates of
        the whole run."""
        return [grouped]

    def optimizer_groups(self, config, schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
        """Optimizer groups of its own beside the learning-rate groups, by label (the unitary adapter's
        Cayley steps): each takes the trainable subtrees `group_of` labels so, instead of the base optimizer."""
        return {}

    def group_of(self, section, node) -> str | None:
        """The label (a key of `optimizer_groups`) of a trainable subtree that one of its own groups
        updates, every leaf under it; None for the rest (the learning-rate groups)."""
        return None

    # ------------------------------------------------------------------ state beside the trainable tree

    def forward_state(self, opt_state) -> Any:
        """What its forward pass reads from the optimizer state beside the trainable tree (the hybrid's
        lambdas), or None: the step sets it into the tree by `with_forward_state` before each forward,
        the reference policy of GRPO keeps a copy of it, and logging and plots read it."""
        return None

    def with_forward_state(self, params: dict, forward_state: Any) -> dict:
        """The adapted tree `params` with `forward_state` set into it."""
        return params

    def own_weights(self, config, total_steps: int) -> OwnWeights | None:
        """The weights it trains itself, outside the optimizer (zo_fo's base weights, by SPSA), or None."""
        return None

    def logged(self, forward_state) -> dict[str, Any]:
        """What the metrics log records of its state every `logging.every_steps` (the hybrid's lambda of
        every layer), as JSON-ready values."""
        return {}

    def figures(self, forward_state, output_dir: str) -> dict[str, str]:
        """End-of-run figures of its state written under `output_dir`, by name (the hybrid's lambda
        heatmap)."""
        return {}

    # ------------------------------------------------------------------ start-up choices

    # Its start-up choice's key in checkpoint metadata (None: the method makes no choice).
    SELECTION_KEY: ClassVar[str | None] = None

    def select(self, config, gradients: dict) -> Any:
        """What the method chooses at start-up from the gradient estimate (Hybrid-LoRA's modules): an
        object with `to_json()` and `table()` (a few lines for the log), recorded in every checkpoint
        under `SELECTION_KEY`, so a resumed run keeps it. None: nothing."""
        return None

    def planned_selection(self, config, model_config) -> Any:
        """A stand-in for `select`'s choice when there are no gradients (the planner)."""
        return None

    def selection_from_json(self, data) -> Any:
        """The inverse of the selection's `to_json()`."""
        raise NotImplementedError

    def adapter_spec(self, config, model_config=None, selection=None) -> AdapterSpec:
        """The adapter spec of the run: its adapter on `method.targets` (or the family's default),
        except `method.frozen`."""
        section = config.method
        targets = list(section.targets) if section.targets is not None else None
        return AdapterSpec.for_method(self.adapter_config(section), targets=targets, frozen=list(section.frozen),
                                      family=config.model.family)

    def __repr__(self) -> str:
        return f"<method {self.name}>"
