"""The event history: an append-only record, written in the same transaction as the change.

Writing the event with the state change means a reader never sees one without the other.
Events carry ids and numbers, never patient data.

Event ids are in commit order, which is what lets a follower read ``id > last`` and never
miss or repeat one: ``publish`` only buffers the event on the session, and the session's
``before_commit`` hook inserts the buffered events at the very end of the transaction, on
PostgreSQL under a transaction-scoped advisory lock that is held until the commit. So no
transaction can allocate an event id while another one that already holds smaller ids is
still uncommitted. SQLite serialises writers by itself. Inserting last (rather than taking
the lock at the first ``publish``) keeps the lock for only the insert and the commit, and a
transaction that holds it never waits for a row lock afterwards, so it cannot deadlock.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from pml.store.tables import Event, Run

# An arbitrary constant: the PostgreSQL advisory lock that puts event ids in commit order.
EVENTS_LOCK_ID = 7_150_002
# session.info keys: events buffered by publish; events inserted and waiting for the commit.
_PENDING = "pml.events.pending"
_COMMITTING = "pml.events.committing"

# Every event type pml publishes; subscriptions and filters must name one of these.
EVENT_TYPES = (
    "model.created", "model.updated", "model.deleted",
    "run.state", "curation.progress", "run.curated", "run.tuned", "run.evaluated", "run.approval",
    "trial.started", "trial.metric", "trial.retrying", "trial.finished",
    "deployment.deploying", "deployment.serving", "deployment.failed", "deployment.superseded",
    "deployment.stopped",
)
_TYPE_FORMAT = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$")


@dataclass(frozen=True)
class Announcement:
    """A committed event as told outside SQL (the Redis stream, in-process wake-ups).

    ``data`` is the event's JSON body (ids, counts and metric values, never patient data), so
    the Redis stream is a complete event feed for consumers of its own; pml's followers use
    only the ids and read SQL, the history.
    """

    id: int
    account_id: str
    type: str
    run_id: str = ""
    model_id: str = ""
    data: str = "{}"
    created_at: str = ""

    @classmethod
    def of(cls, row: Event) -> "Announcement":
        created = row.created_at.isoformat() if row.created_at is not None else ""
        return cls(row.id, row.account_id, row.type, row.run_id or "", row.model_id or "",
                   json.dumps(row.data or {}, sort_keys=True, separators=(",", ":")), created)


@dataclass(frozen=True)
class EventFilter:
    """Which of an account's events a reader wants; empty fields match everything."""

    types: frozenset[str] = field(default_factory=frozenset)
    run_id: str = ""
    model_id: str = ""

    def matches(self, account_id: str, item: Announcement) -> bool:
        return (
            item.account_id == account_id
            and (not self.types or item.type in self.types)
            and (not self.run_id or item.run_id == self.run_id)
            and (not self.model_id or item.model_id == self.model_id)
        )


def check_types(field_name: str, types: list[str]) -> list[tuple[str, str]]:
    """Field violations for event type names that pml never publishes (a typo would match nothing)."""
    return [
        (f"{field_name}[{i}]", f"unknown event type {t!r}; known: {', '.join(EVENT_TYPES)}")
        for i, t in enumerate(types)
        if not _TYPE_FORMAT.match(t) or t not in EVENT_TYPES
    ]


def publish(
    session: Session,
    account_id: str,
    type: str,
    *,
    run_id: str | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Record an event with this transaction; its id is assigned when the transaction commits.

    A run's event always names the run's model too, so a model filter sees trial events.
    """
    if run_id and not model_id:
        run = session.get(Run, run_id)
        model_id = run.model_id if run is not None else None
    event = Event(account_id=account_id, type=type, run_id=run_id, model_id=model_id, data=data or {})
    session.info.setdefault(_PENDING, []).append(event)
    return event


def list_events(
    session: Session,
    account_id: str,
    *,
    after_id: int = 0,
    run_id: str | None = None,
    where: EventFilter | None = None,
    limit: int = 500,
) -> list[Event]:
    """The account's events after ``after_id`` in id (= commit) order."""
    query = select(Event).where(Event.account_id == account_id, Event.id > after_id)
    if run_id is not None:
        query = query.where(Event.run_id == run_id)
    if where is not None:
        if where.types:
            query = query.where(Event.type.in_(sorted(where.types)))
        if where.run_id:
            query = query.where(Event.run_id == where.run_id)
        if where.model_id:
            query = query.where(Event.model_id == where.model_id)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))


BeforeInsert = Callable[[Session, list[Event]], Any]
"""Called inside the transaction right after the events are inserted (ids known); what it
returns is handed to the after-commit callback (the webhook deliveries it wrote)."""
AfterCommit = Callable[[list[Announcement], Any], None]
"""Called once the transaction has committed, with the events it published."""


def install(sessions: sessionmaker[Session], after_insert: BeforeInsert, after_commit: AfterCommit) -> None:
    """Hook event insertion and the after-commit announcement into every session of ``sessions``."""

    def before_commit(session: Session) -> None:
        if session.in_nested_transaction():
            return  # a savepoint: the outer commit inserts them
        pending: list[Event] = session.info.pop(_PENDING, [])
        if not pending:
            return
        # Write the transaction's other changes first: once it holds the lock, a transaction
        # only inserts new rows, so it never waits for a row lock that a waiter holds.
        session.flush()
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": EVENTS_LOCK_ID})
        session.add_all(pending)
        session.flush()
        extra = after_insert(session, pending)
        session.info[_COMMITTING] = ([Announcement.of(e) for e in pending], extra)

    def committed(session: Session) -> None:
        done = session.info.pop(_COMMITTING, None)
        if done is not None:
            after_commit(*done)

    def rolled_back(session: Session, previous: SessionTransaction) -> None:
        if previous.parent is None:
            session.info.pop(_PENDING, None)
            session.info.pop(_COMMITTING, None)

    sa_event.listen(sessions, "before_commit", before_commit)
    sa_event.listen(sessions, "after_commit", committed)
    sa_event.listen(sessions, "after_soft_rollback", rolled_back)
