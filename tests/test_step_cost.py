"""The compiled training step's FLOPs (XLA's cost analysis of the lowered step, every layer unrolled so
that none is counted once for thirty): SmolLM2-135M's shapes, batch 8 x 128, no weights read.

The hybrid multiplies each projection by W0 once, as LoRA does; logits only at the loss positions take
the head's share of a step away."""

from __future__ import annotations

import functools

import jax
import pytest

from hyjax.config import load_config
from hyjax.model import preset
from hyjax.training import plan_run, run_layout

MODEL = preset("smollm2-135m").replace(scan_unroll=30)


@functools.cache
def step_flops(method: str, loss_slots: int | None = None) -> float:
    """FLOPs of one step of `method`; `loss_slots`: the batch's loss_positions width (None: 128, logits
    at every position)."""
    config = load_config(None, ["model.preset=smollm2-135m", f"method.name={method}", "train.global_batch_size=8",
                                "data.max_length=128", "train.steps=10", "export.peft_adapter=false"])
    plan = plan_run(config, MODEL, run_layout(config.mesh), total_steps=10)
    state, frozen, batch = plan.abstract_arguments()
    if loss_slots is not None:
        like = batch["loss_positions"]
        batch = {**batch, "loss_positions": jax.ShapeDtypeStruct(like.shape[:-1] + (loss_slots,), like.dtype,
                                                                  sharding=like.sharding)}
    return plan.train_step().lower(state, frozen, batch).cost_analysis()["flops"]


def test_the_hybrid_costs_what_lora_costs():
    lora, hybrid, full = step_flops("lora"), step_flops("hybrid"), step_flops("full")
    assert lora > 4e11  # every layer counted: about 6 * 135M * 1024 for full fine-tuning, less for LoRA
    assert hybrid <= 1.15 * lora, hybrid / lora
    assert hybrid <= 0.8 * full, hybrid / full


@pytest.mark.parametrize("method", ["lora", "hybrid"])
def test_logits_at_the_loss_positions_take_the_heads_share_away(method):
    """32 loss slots instead of 128 positions per row: the head (576 x 49,152, frozen: its forward and the
    gradient of its input) runs on a quarter of the positions."""
    head = 2 * 2 * 576 * 49152  # FLOPs of the tied head per position: forward and input-gradient matmuls
    saved = step_flops(method) - step_flops(method, loss_slots=32)
    assert saved == pytest.approx(head * 8 * (128 - 32), rel=0.1)
