"""`Method`: everything hyjax must know of one fine-tuning method, in one object.

The rest of hyjax asks the run's method (`hyjax.methods.method_of(config)`) instead of comparing its
name: which adapter it puts on the targets, whether it starts from gradients of the pretrained model,
what it adds to the optimizer, whether it trains base weights by zeroth-order updates, what it
chooses at start-up and records in the checkpoint (Hybrid-LoRA's modules), and how it exports.

The hooks take the whole `RunConfig` (`config`) or its `method` section (`section`); the defaults fit
a plain adapter method (LoRA, BOFT, ...): override what differs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import optax

from hyjax.adapters import AdapterSpec


class Method:
    """A fine-tuning method of `python -m hyjax.train` (`method.name`)."""

    name: ClassVar[str]  # method.name
    # The method sub-sections (`method.lora`, ...) whose settings it reads: they identify its runs.
    sections: ClassVar[tuple[str, ...]] = ()
    # Starts from the full gradient of the pretrained model, averaged over a few batches (LoRA-GA and
    # the hybrid initialise from it, Hybrid-LoRA scores its modules with it); `from_gradients` may
    # depend on the method's settings.
    starts_from_gradients: ClassVar[bool] = False
    # Its per-layer mixing weights live in the optimizer state and are set into the tree before each
    # forward (the hybrid's lambdas).
    lambdas: ClassVar[bool] = False

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

    def zeroth_order(self, config, total_steps: int):
        """The `hyjax.optim.zeroth_order.ZerothOrder` of the base weights it trains by SPSA, or None."""
        return None

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
