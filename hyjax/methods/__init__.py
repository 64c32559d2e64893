"""The fine-tuning methods of `python -m hyjax.train`, one `Method` object each, by `method.name`."""

from hyjax.methods.base import Method, OwnWeights
from hyjax.methods.registry import METHODS, method_of, register

__all__ = ["METHODS", "Method", "OwnWeights", "method_of", "register"]
