"""The command lines: `python -m hyjax.train`, `python -m hyjax.plan`, `python -m hyjax.generate`."""
