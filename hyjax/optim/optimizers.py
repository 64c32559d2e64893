"""The base optimizers of a run's `train` section: AdamW, Adafactor or SGD, with decoupled weight decay."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")  # train.optimizer


def base_optimizer(train, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """`train.optimizer` at `learning_rate`, with decoupled weight decay."""
    if train.optimizer == "adamw":
        return optax.adamw(learning_rate, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay)
    if train.optimizer == "adafactor":
        return optax.adafactor(learning_rate, weight_decay_rate=train.weight_decay or None)
    sgd = optax.sgd(learning_rate, momentum=train.b1 or None)
    return optax.chain(optax.add_decayed_weights(train.weight_decay), sgd) if train.weight_decay else sgd
