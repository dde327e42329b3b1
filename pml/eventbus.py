"""Commit → wake-up: committed events are announced on a Redis stream, or in process.

SQL is the history and the only thing a stream reads. To pml's own followers an announcement
only says "look now" (its ids and type let a waiting stream skip a read its filter cannot
match); a lost announcement delays a stream by at most its re-check interval, never loses an
event. The Redis stream entries also carry each event's data and time, trimmed to about
``event_stream_maxlen`` entries, for consumers that read the stream themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable

import redis

from pml.events import Announcement
from pml.settings import Settings

log = logging.getLogger(__name__)

# Announcements a hub keeps so that waiting streams can check them against their filter.
RECENT_ANNOUNCEMENTS = 4096
# How long one XREAD blocks before the reader looks at whether it should stop.
XREAD_BLOCK_MS = 1000
# Pause before the reader retries after Redis went away (streams re-check SQL meanwhile).
REDIS_RETRY_S = 1.0


class EventHub:
    """Wakes the streams of this process that wait for events, without polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._recent: deque[tuple[int, Announcement]] = deque(maxlen=RECENT_ANNOUNCEMENTS)

    def mark(self) -> int:
        """Take this before reading SQL; ``wait`` then returns for anything announced since."""
        with self._cond:
            return self._seq

    def announce(self, items: Iterable[Announcement]) -> None:
        with self._cond:
            for item in items:
                self._seq += 1
                self._recent.append((self._seq, item))
            self._cond.notify_all()

    def kick(self) -> None:
        """Wake every waiter so it looks at its ``stop`` condition (a client went away)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, mark: int, wanted: Callable[[Announcement], bool], timeout_s: float,
             stop: Callable[[], bool] = lambda: False) -> None:
        """Return when something ``wanted`` was announced after ``mark``, on ``stop`` or timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._seq > mark:
                    if not self._recent or self._recent[0][0] > mark + 1:
                        return  # announcements were dropped meanwhile: read to be sure
                    for seq, item in reversed(self._recent):
                        if seq <= mark:
                            break
                        if wanted(item):
                            return
                    mark = self._seq
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stop():
                    return
                self._cond.wait(remaining)


class EventBus:
    """Announces committed events: XADD to ``<namespace>:events`` with Redis, else to the hub.

    With Redis every process (workers, gateways) announces to the one stream, and each gateway
    runs one reader thread that turns stream entries into wake-ups of its hub.
    """

    def __init__(self, settings: Settings):
        self.redis_url = settings.redis_url
        self.stream_key = f"{settings.redis_namespace}:events"
        self.maxlen = settings.event_stream_maxlen
        self.hub = EventHub()
        self._client: redis.Redis | None = None
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def committed(self, items: list[Announcement]) -> None:
        """Called after a transaction that published ``items`` committed; never raises."""
        if not self.redis_url:
            self.hub.announce(items)
            return
        try:
            pipe = self._redis().pipeline(transaction=False)
            for item in items:
                fields = {"id": item.id, "account": item.account_id, "type": item.type,
                          "run": item.run_id, "model": item.model_id, "data": item.data,
                          "time": item.created_at}
                pipe.xadd(self.stream_key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
        except redis.RedisError as exc:
            # Committed already: the followers' SQL re-check finds the events a little later.
            log.warning("could not announce %d event(s) on %s: %s", len(items), self.stream_key, type(exc).__name__)

    def follow(self) -> EventHub:
        """The hub that streams wait on; with Redis, starts this process's stream reader once."""
        if self.redis_url:
            with self._lock:
                if self._reader is None:
                    self._reader = threading.Thread(target=self._read_stream, name="pml-event-reader", daemon=True)
                    self._reader.start()
        return self.hub

    def close(self) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._client is not None:
            self._client.close()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            assert self.redis_url
            self._client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        return self._client

    def _read_stream(self) -> None:
        assert self.redis_url
        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=XREAD_BLOCK_MS / 1000 + 5)
        last: str | None = None
        while not self._closed.is_set():
            try:
                if last is None:  # a concrete id, so nothing added between two XREADs is skipped
                    newest = client.xrevrange(self.stream_key, count=1)
                    last = newest[0][0] if newest else "0-0"
                reply = client.xread({self.stream_key: last}, count=1000, block=XREAD_BLOCK_MS)
                for _key, entries in reply or []:
                    items = []
                    for entry_id, fields in entries:
                        last = entry_id
                        items.append(Announcement(int(fields["id"]), fields["account"], fields["type"],
                                                  fields.get("run", ""), fields.get("model", "")))
                    self.hub.announce(items)
            except redis.RedisError as exc:
                log.warning("event stream reader: %s; retrying", type(exc).__name__)
                last = None
                self._closed.wait(REDIS_RETRY_S)
        client.close()
