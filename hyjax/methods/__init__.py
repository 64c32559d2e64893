"""The fine-tuning methods of `python -m hyjax.train`, one `Method` object each, by `method.name`."""

from hyjax.methods.base import Method
from hyjax.methods.registry import METHODS, method_of

__all__ = ["METHODS", "Method", "method_of"]
