"""The event history: an append-only record, written in the same transaction as the change.

Writing the event with the state change means a reader never sees one without the other.
Events carry ids and numbers, never patient data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.store.tables import Event


def publish(
    session: Session,
    account_id: str,
    type: str,
    *,
    run_id: str | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    event = Event(account_id=account_id, type=type, run_id=run_id, model_id=model_id, data=data or {})
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    account_id: str,
    *,
    after_id: int = 0,
    run_id: str | None = None,
    limit: int = 500,
) -> list[Event]:
    query = select(Event).where(Event.account_id == account_id, Event.id > after_id)
    if run_id is not None:
        query = query.where(Event.run_id == run_id)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))
