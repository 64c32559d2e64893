"""Former name of `hyjax.weights` (model-weight I/O), kept so that `from hyjax.checkpoints import
load_checkpoint` written against older releases still works."""

from hyjax.weights import *  # noqa: F401,F403
from hyjax.weights import __all__  # noqa: F401
