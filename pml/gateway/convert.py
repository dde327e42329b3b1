"""Store rows → pml.v1 messages."""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf.timestamp_pb2 import Timestamp

from pml.accounts import public_fhir_source
from pml.store.tables import Account, ApiKey, Approval, AuditEntry, Event, Model, Run, Trial
from pml.tuning.metrics import MetricPoint
from pml.v1 import pml_pb2 as pb


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def account(row: Account) -> pb.Account:
    return pb.Account(
        id=row.id, name=row.name, fhir_source_json=json.dumps(public_fhir_source(row.fhir_source)), create_time=timestamp(row.created_at)
    )


def model(row: Model) -> pb.Model:
    return pb.Model(
        id=row.id, name=row.name, config_json=json.dumps(row.config), champion_run_id=row.champion_run_id or "",
        create_time=timestamp(row.created_at),
    )


def run(row: Run) -> pb.Run:
    metrics = row.metrics or {}
    champion = metrics.get("champion")
    return pb.Run(
        id=row.id, model_id=row.model_id, state=pb.RunState.Value(f"RUN_STATE_{row.status}"),
        failed_step=row.failed_step or "", failure_reason=row.failure_reason or "",
        snapshot_id=row.snapshot_id or "", challenger_trial_id=row.challenger_trial_id or "",
        champion_run_id=row.champion_run_id or "",
        challenger_metrics=metrics.get("challenger") or {}, champion_metrics=champion or {},
        has_champion_metrics=champion is not None, artifact_sha256=row.artifact_sha256 or "",
        deploy_status=row.deploy_status or "", deploy_error=row.deploy_error or "",
        curation_report_json=json.dumps(row.curation_report) if row.curation_report else "",
        create_time=timestamp(row.created_at), end_time=timestamp(row.ended_at),
        config_json=json.dumps(row.config),
    )


def api_key(row: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=row.id, account_id=row.account_id, name=row.name, create_time=timestamp(row.created_at),
        revoke_time=timestamp(row.revoked_at),
    )


def audit_entry(row: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=row.id, account_id=row.account_id, actor=row.actor, action=row.action, target_type=row.target_type,
        target_id=row.target_id, outcome=row.outcome, interface=row.interface, create_time=timestamp(row.created_at),
    )


def trial(row: Trial, series: dict[str, list[MetricPoint]] | None = None) -> pb.Trial:
    """A trial; ``series`` (GetTrial) adds every metric's points in log order."""
    return pb.Trial(
        id=row.id, run_id=row.run_id, number=row.number, status=row.status,
        hyperparameters={k: str(v) for k, v in row.hyperparameters.items()},
        objective=row.objective or 0.0, has_objective=row.objective is not None,
        final_metrics={k: float(v) for k, v in (row.final_metrics or {}).items()},
        failure_reason=row.failure_reason or "",
        start_time=timestamp(row.started_at), end_time=timestamp(row.ended_at),
        metric_series=[
            pb.MetricSeries(name=name, points=[
                pb.MetricPoint(step=p.step, value=p.value, time=timestamp(dt.datetime.fromtimestamp(p.time, dt.timezone.utc)))
                for p in points
            ])
            for name, points in sorted((series or {}).items())
        ],
    )


def event(row: Event) -> pb.Event:
    return pb.Event(
        id=row.id, type=row.type, run_id=row.run_id or "", model_id=row.model_id or "",
        data_json=json.dumps(row.data), create_time=timestamp(row.created_at),
    )


def approval(row: Approval) -> pb.Approval:
    decision = pb.DECISION_APPROVED if row.decision == "approved" else pb.DECISION_REJECTED
    return pb.Approval(
        id=row.id, run_id=row.run_id, decision=decision, description=row.description, user=row.user,
        create_time=timestamp(row.created_at), actor=row.actor,
    )
