"""The error every checkpoint reader and writer raises for bad input."""


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used; the message says which file and what to do."""
