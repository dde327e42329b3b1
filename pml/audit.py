"""The audit log: every command, who made it, on what, and how it ended.

Entries are written in their own transaction after the command, so failed and refused
commands are logged too. They hold ids and status names only, never patient data, and can
be exported as FHIR R5 ``AuditEvent`` resources for a hospital's audit repository.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.store.tables import AuditEntry

# The FHIR "C/R/U/D/E" action of each command verb (the part after the last dot).
_FHIR_ACTIONS = {
    "create": "C", "update": "U", "delete": "D", "cancel": "U", "approve": "U", "revoke": "U",
    "download": "R", "predict": "E", "deploy": "E", "get": "R", "list": "R",
}
AUDIT_SYSTEM = "https://pml.dev/fhir/CodeSystem/audit-action"
OBSERVER = "pml-gateway"


def record(
    session: Session,
    *,
    account_id: str,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    outcome: str,
    interface: str,
) -> AuditEntry:
    """Add one entry. Ids come from the request and may be anything (a refused call's account
    id is unchecked), so they are cut to their columns' widths: a long one must not turn the
    command's own error into a failed audit write."""
    entry = AuditEntry(
        account_id=account_id[:64], actor=actor, action=action, target_type=target_type,
        target_id=target_id[:200], outcome=outcome, interface=interface,
    )
    session.add(entry)
    session.flush()
    return entry


def list_entries(session: Session, account_id: str, *, after_id: int = 0, limit: int | None = None,
                 newest_first: bool = False) -> list[AuditEntry]:
    query = select(AuditEntry).where(AuditEntry.account_id == account_id, AuditEntry.id > after_id)
    query = query.order_by(AuditEntry.id.desc() if newest_first else AuditEntry.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def to_audit_event(entry: AuditEntry) -> dict[str, Any]:
    """One entry as a FHIR R5 AuditEvent (JSON). Outcome codes follow FHIR's issue severity."""
    verb = entry.action.rsplit(".", 1)[-1]
    failed = entry.outcome != "ok"
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"pml-audit-{entry.id}",
        "code": {"coding": [{"system": AUDIT_SYSTEM, "code": entry.action}], "text": entry.action},
        "action": _FHIR_ACTIONS.get(verb, "E"),
        "recorded": _iso(entry.created_at),
        "outcome": {
            "code": {
                "system": "http://hl7.org/fhir/issue-severity",
                "code": "error" if failed else "information",
            },
            "detail": [{"text": entry.outcome}],
        },
        "agent": [{
            "who": {"identifier": {"system": "https://pml.dev/actor", "value": entry.actor}},
            "requestor": True,
        }],
        "source": {"observer": {"display": OBSERVER}},
        "entity": [{
            "what": {"identifier": {"system": f"https://pml.dev/{entry.target_type}", "value": entry.target_id}},
        }] if entry.target_id else [],
        "extension": [
            {"url": "https://pml.dev/fhir/StructureDefinition/account", "valueString": entry.account_id},
            {"url": "https://pml.dev/fhir/StructureDefinition/interface", "valueCode": entry.interface},
        ],
    }
    if not event["entity"]:
        del event["entity"]
    return event


def export_bundle(entries: list[AuditEntry]) -> dict[str, Any]:
    """A FHIR ``collection`` Bundle of AuditEvents, each validated with fhir.resources."""
    from fhir.resources.auditevent import AuditEvent
    from fhir.resources.bundle import Bundle

    resources = [AuditEvent.model_validate(to_audit_event(e)) for e in entries]
    bundle = Bundle.model_validate({
        "resourceType": "Bundle", "type": "collection",
        "timestamp": _iso(dt.datetime.now(dt.timezone.utc)),
        "entry": [{"fullUrl": f"urn:pml:audit:{e.id}", "resource": r.model_dump(mode="json", exclude_none=True)}
                  for e, r in zip(entries, resources)],
    })
    return bundle.model_dump(mode="json", exclude_none=True)
