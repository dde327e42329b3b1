"""The dramatiq broker: Redis when ``PML_REDIS_URL`` is set, otherwise in memory.

Each step of a run is its own queue, so operators scale each worker pool on its own. pml code
enqueues steps by name (``enqueue_step``), which keeps ``pml/`` free of imports of ``actors/``.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.brokers.stub import StubBroker

from pml.settings import Settings

# queue name → actor name; one actor per queue.
STEPS = {
    "curate": "curator",
    "tune": "tuner",
    "evaluate": "evaluator",
    "deploy": "deployer",
}

# Measured here: with dramatiq's defaults a dead worker's messages were not requeued within
# five minutes; these bring them back within seconds (see DESIGN.md).
HEARTBEAT_TIMEOUT_MS = 10_000
# 5% of broker calls (dramatiq's scale is 1,000,000 calls; 1,000 of them, its default, left a
# killed tune worker's message unrequeued for over four minutes here).
MAINTENANCE_CHANCE = MAINTENANCE_SCALE // 20


def make_broker(settings: Settings) -> dramatiq.Broker:
    if settings.redis_url:
        return RedisBroker(
            url=settings.redis_url,
            namespace=settings.redis_namespace,
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=MAINTENANCE_CHANCE,
        )
    return StubBroker()


def enqueue_step(broker: dramatiq.Broker, queue: str, account_id: str, object_id: str) -> None:
    """Send the message of one step; it carries ids only, never patient data."""
    message = dramatiq.Message(
        queue_name=queue,
        actor_name=STEPS[queue],
        args=(account_id, object_id),
        kwargs={},
        options={},
    )
    broker.enqueue(message)
