"""dramatiq actors, one module and one queue per step. Thin: decode, call pml, enqueue next.

Importing this package registers every actor on the broker set with ``dramatiq.set_broker``.
"""

from actors import curator, deployer, evaluator, notify, tuner

__all__ = ["curator", "tuner", "evaluator", "deployer", "notify"]
