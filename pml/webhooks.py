"""Webhooks: an account's subscriptions, and signed delivery of its events to them.

A delivery row is written in the transaction that publishes the event (so a crash after the
commit cannot lose it) and the notify actor attempts it: a POST of the event as JSON, signed
with HMAC-SHA256 of the exact body, retried with exponential backoff; the last outcome stays
visible on the row. Bodies carry the event only: ids, type, numbers, time; no patient data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Callable, ContextManager
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.errors import InvalidArgument, NotFound, require_id
from pml.events import check_types
from pml.settings import Settings
from pml.store.tables import Event, WebhookDelivery, WebhookSubscription, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Pml-Signature"
EVENT_ID_HEADER = "X-Pml-Event-Id"
EVENT_TYPE_HEADER = "X-Pml-Event-Type"
DELIVERY_ID_HEADER = "X-Pml-Delivery-Id"
DELIVERY_STATES = ("PENDING", "DELIVERED", "FAILED")
MAX_URL_LENGTH = 2048
# While one attempt runs, a duplicate message for the same delivery must not start another.
CLAIM_MARGIN_S = 5.0
# A scheduled retry may arrive this early (clock granularity of the delay queue).
EARLY_TOLERANCE_S = 0.5
MAX_ERROR_CHARS = 500


# ---- subscriptions -----------------------------------------------------------------------


def check_url(url: str) -> list[tuple[str, str]]:
    """Field violations of a subscription URL: absolute http(s) with a host, no credentials."""
    if not url:
        return [("url", "required")]
    if len(url) > MAX_URL_LENGTH:
        return [("url", f"longer than {MAX_URL_LENGTH} characters")]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        return [("url", f"not a valid URL: {exc}")]
    if parts.scheme not in ("http", "https"):
        return [("url", "must start with http:// or https://")]
    if not parts.hostname:
        return [("url", "must name a host")]
    if parts.username or parts.password:
        return [("url", "must not carry credentials; verify the signature instead")]
    return []


def create_subscription(session: Session, account_id: str, url: str,
                        event_types: list[str]) -> WebhookSubscription:
    """A new subscription with a fresh random secret (the caller shows it once)."""
    violations = check_url(url) + check_types("event_types", event_types)
    if violations:
        raise InvalidArgument(violations)
    row = WebhookSubscription(account_id=account_id, url=url, event_types=sorted(set(event_types)),
                              secret=secrets.token_hex(32))
    session.add(row)
    session.flush()
    return row


def get_subscription(session: Session, account_id: str, subscription_id: str) -> WebhookSubscription:
    require_id("subscription_id", subscription_id)
    row = session.scalar(select(WebhookSubscription).where(
        WebhookSubscription.account_id == account_id, WebhookSubscription.id == subscription_id))
    if row is None:
        raise NotFound(f"subscription {subscription_id} not found")
    return row


def list_subscriptions(session: Session, account_id: str) -> list[WebhookSubscription]:
    query = select(WebhookSubscription).where(WebhookSubscription.account_id == account_id)
    return list(session.scalars(query.order_by(WebhookSubscription.created_at, WebhookSubscription.id)))


def delete_subscription(session: Session, account_id: str, subscription_id: str) -> None:
    """Delete the subscription and its deliveries; queued attempts for it then do nothing."""
    row = get_subscription(session, account_id, subscription_id)
    for delivery in session.scalars(select(WebhookDelivery).where(WebhookDelivery.subscription_id == row.id)):
        session.delete(delivery)
    session.delete(row)


def list_deliveries(session: Session, account_id: str, subscription_id: str,
                    state: str = "") -> list[WebhookDelivery]:
    """A subscription's deliveries, newest first, optionally of one state."""
    if state and state not in DELIVERY_STATES:
        raise InvalidArgument([("state", f"must be one of {', '.join(DELIVERY_STATES)} (or empty)")])
    get_subscription(session, account_id, subscription_id)
    query = select(WebhookDelivery).where(WebhookDelivery.account_id == account_id,
                                          WebhookDelivery.subscription_id == subscription_id)
    if state:
        query = query.where(WebhookDelivery.state == state)
    return list(session.scalars(query.order_by(WebhookDelivery.event_id.desc(), WebhookDelivery.id)))


# ---- deliveries --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedDelivery:
    """A delivery written with its event, to be handed to the notify queue after the commit."""

    account_id: str
    delivery_id: str


def plan_deliveries(session: Session, events: list[Event]) -> list[PlannedDelivery]:
    """Inside the publishing transaction: one PENDING delivery per (event, matching subscription)."""
    accounts = {e.account_id for e in events}
    subscriptions = list(session.scalars(
        select(WebhookSubscription).where(WebhookSubscription.account_id.in_(sorted(accounts)))))
    if not subscriptions:
        return []
    planned = []
    now = utcnow()
    for event in events:
        for sub in subscriptions:
            if sub.account_id == event.account_id and (not sub.event_types or event.type in sub.event_types):
                row = WebhookDelivery(account_id=event.account_id, subscription_id=sub.id, event_id=event.id,
                                      event_type=event.type, next_attempt_at=now)
                session.add(row)
                session.flush()
                planned.append(PlannedDelivery(event.account_id, row.id))
    return planned


def event_body(event: Event) -> bytes:
    """The exact bytes POSTed (and signed): the event, nothing else."""
    created = event.created_at if event.created_at.tzinfo else event.created_at.replace(tzinfo=dt.timezone.utc)
    body = {
        "id": event.id, "type": event.type, "runId": event.run_id or "", "modelId": event.model_id or "",
        "data": event.data, "time": created.isoformat().replace("+00:00", "Z"),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, body: bytes) -> str:
    """The ``X-Pml-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Attempt:
    url: str
    secret: str
    body: bytes
    event_id: int
    event_type: str
    attempts: int


def _claim(session: Session, account_id: str, delivery_id: str, settings: Settings) -> Attempt | None:
    """Take the delivery for one attempt, or None when it is done, gone or not due yet."""
    row = session.scalar(select(WebhookDelivery).where(
        WebhookDelivery.account_id == account_id, WebhookDelivery.id == delivery_id).with_for_update())
    if row is None or row.state != "PENDING":
        return None
    now = utcnow()
    due = row.next_attempt_at
    if due is not None:
        due = due if due.tzinfo else due.replace(tzinfo=dt.timezone.utc)
        if due > now + dt.timedelta(seconds=EARLY_TOLERANCE_S):
            return None  # a duplicate message: the scheduled one (or the running attempt) owns it
    sub = session.get(WebhookSubscription, row.subscription_id)
    event = session.get(Event, row.event_id)
    if sub is None or event is None:
        return None
    row.attempts += 1
    row.next_attempt_at = now + dt.timedelta(seconds=settings.webhook_timeout_s + CLAIM_MARGIN_S)
    return Attempt(sub.url, sub.secret, event_body(event), event.id, event.type, row.attempts)


def _post(attempt: Attempt, delivery_id: str, timeout_s: float) -> tuple[int | None, str | None]:
    """POST once; (status code, error) where error is None on a 2xx answer."""
    headers = {
        "Content-Type": "application/json", SIGNATURE_HEADER: signature(attempt.secret, attempt.body),
        EVENT_ID_HEADER: str(attempt.event_id), EVENT_TYPE_HEADER: attempt.event_type,
        DELIVERY_ID_HEADER: delivery_id, "User-Agent": "pml-webhooks/1",
    }
    try:
        # Redirects are not followed: the body and signature go only to the URL subscribed.
        response = httpx.post(attempt.url, content=attempt.body, headers=headers, timeout=timeout_s,
                              follow_redirects=False)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"HTTP {response.status_code}"


def backoff_s(settings: Settings, attempts: int) -> float:
    """Wait after the ``attempts``-th failed attempt: the base, doubled after each failure."""
    return settings.webhook_backoff_s * 2 ** (attempts - 1)


def deliver(session_factory: Callable[[], ContextManager[Session]], settings: Settings, account_id: str,
            delivery_id: str) -> float | None:
    """Attempt one delivery; returns the seconds until the next attempt, or None when done.

    ``session_factory`` is ``App.session``: the claim and the outcome are two short
    transactions, so no row lock is held while the receiver answers.
    """
    with session_factory() as session:
        attempt = _claim(session, account_id, delivery_id, settings)
    if attempt is None:
        return None
    status, error = _post(attempt, delivery_id, settings.webhook_timeout_s)
    with session_factory() as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None:
            return None  # the subscription was deleted meanwhile
        row.last_status_code, row.last_error = status, error
        if error is None:
            row.state, row.delivered_at, row.next_attempt_at = "DELIVERED", utcnow(), None
            return None
        if row.attempts >= settings.webhook_max_attempts:
            row.state, row.next_attempt_at = "FAILED", None
            log.info("webhook delivery %s failed after %d attempts", delivery_id, row.attempts)
            return None
        wait = backoff_s(settings, row.attempts)
        row.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
        return wait
