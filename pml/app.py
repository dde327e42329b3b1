"""The running pieces of one pml process, built once from Settings and passed down.

Actors and the gateway reach the store, the blob stores and the broker through an App; tests
build their own App against real services.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dramatiq
from sqlalchemy.orm import Session

from pml import events, webhooks
from pml.blobs import BlobStore
from pml.broker import enqueue_step, make_broker
from pml.eventbus import EventBus
from pml.settings import Settings
from pml.store.db import make_engine, make_sessionmaker, migrate

log = logging.getLogger(__name__)


class App:
    def __init__(self, settings: Settings, broker: dramatiq.Broker | None = None):
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.sqlalchemy_url)
        migrate(self.engine, settings.home)
        self.sessions = make_sessionmaker(self.engine)
        self._broker = broker
        self.eventbus = EventBus(settings)
        events.install(self.sessions, webhooks.plan_deliveries, self._events_committed)

    @property
    def broker(self) -> dramatiq.Broker:
        if self._broker is None:
            self._broker = make_broker(self.settings)
        return self._broker

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.sessions() as session, session.begin():
            yield session

    def account_home(self, account_id: str) -> Path:
        return self.settings.home / "accounts" / account_id

    def blobs(self, account_id: str) -> BlobStore:
        return BlobStore(self.account_home(account_id) / "blobs")

    def enqueue(self, queue: str, account_id: str, object_id: str, delay_s: float | None = None) -> None:
        enqueue_step(self.broker, queue, account_id, object_id, delay_s)

    def _events_committed(self, items: list[events.Announcement], deliveries: list[webhooks.PlannedDelivery]) -> None:
        """After every commit that published events: wake the streams, hand deliveries to notify."""
        self.eventbus.committed(items)
        for planned in deliveries:
            try:
                self.enqueue("notify", planned.account_id, planned.delivery_id)
            except Exception:  # committed already; the delivery stays PENDING and visible
                log.exception("could not enqueue webhook delivery %s", planned.delivery_id)

    def close(self) -> None:
        """Stop the event stream reader and close the store's connections."""
        self.eventbus.close()
        self.engine.dispose()


_current: App | None = None
_lock = threading.Lock()


def set_current_app(app: App | None) -> None:
    """Install the App that actors in this process use (embedded mode, tests)."""
    global _current
    _current = app


def current_app() -> App:
    """The process's App; a worker process builds it from the environment on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = App(Settings())
        return _current
