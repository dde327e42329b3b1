"""Store rows → HTTP bodies, including pml's run states mapped to the public API's.

Run status: PENDING, CURATING, TUNING, EVALUATING → ``running``; COMPLETED → ``succeeded``;
FAILED → ``failed`` with ``error`` "<step>: <reason>"; CANCELLED → ``failed`` with ``error``
"cancelled".
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.evaluation.metrics import direction
from pml.http.schemas import ApprovalBody, Metric, ModelBody, Parameter, RunBody, RunMetrics, RunStatus
from pml.schemas.config import DeployApproach, ProblemDefinition, TrainingApproach
from pml.store.tables import Approval, Model, Run, Trial

STATUS: dict[str, RunStatus] = {
    "PENDING": "running", "CURATING": "running", "TUNING": "running", "EVALUATING": "running",
    "COMPLETED": "succeeded", "FAILED": "failed", "CANCELLED": "failed",
}

DEPLOY_STATUS = {
    None: "notDeployed", "NOT_DEPLOYED": "notDeployed", "PENDING": "pending", "DEPLOYING": "deploying",
    "DEPLOYED": "deployed", "FAILED": "failed", "SUPERSEDED": "superseded",
    "STOPPED": "stopped",
}


def millis(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return int(value.timestamp() * 1000)


def model(row: Model) -> ModelBody:
    return ModelBody.model_validate({
        **row.config, "id": row.id, "accountId": row.account_id, "championId": row.champion_run_id,
        "deployedId": row.champion_run_id, "created": millis(row.created_at), "updated": millis(row.updated_at),
    })


def approval(row: Approval) -> ApprovalBody:
    return ApprovalBody(
        id=row.id, decision="approved" if row.decision == "approved" else "rejected", description=row.description,
        timestamp=millis(row.created_at) or 0, actor=row.actor, user=row.user,
    )


def _slug(name: str, run_id: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{words or 'run'}-{run_id[:8]}"


def _error(row: Run) -> str | None:
    if row.status == "FAILED":
        return f"{row.failed_step}: {row.failure_reason}" if row.failed_step else (row.failure_reason or "failed")
    if row.status == "CANCELLED":
        return "cancelled"
    return None


def _number(value: Any) -> bool:
    """JSON has no NaN or infinity (an undefined metric, e.g. AUC with one class, is left out)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _test_metrics(values: dict[str, Any] | None) -> list[Metric]:
    return [
        Metric(name=name, value=float(value), stage="evaluation", direction=direction(name))  # type: ignore[arg-type]
        for name, value in sorted((values or {}).items()) if _number(value)
    ]


def _training_metrics(trial: Trial | None, objective: dict[str, Any]) -> list[Metric]:
    """The challenger trial's own numbers; only the objective has a known direction."""
    if trial is None:
        return []
    out = []
    for name, value in sorted((trial.final_metrics or {}).items()):
        if _number(value):
            way = objective.get("direction") if name == objective.get("metric") else None
            out.append(Metric(name=name, value=float(value), stage="training", direction=way))
    return out


def runs(session: Session, rows: list[Run]) -> list[RunBody]:
    """Several runs, with their challenger trials and approvals read in two queries."""
    if not rows:
        return []
    account_id = rows[0].account_id
    trial_ids = [r.challenger_trial_id for r in rows if r.challenger_trial_id]
    trials = {
        t.id: t for t in session.scalars(
            select(Trial).where(Trial.account_id == account_id, Trial.id.in_(trial_ids))
        )
    } if trial_ids else {}
    approvals: dict[str, list[Approval]] = {}
    query = select(Approval).where(Approval.account_id == account_id, Approval.run_id.in_([r.id for r in rows]))
    for row in session.scalars(query.order_by(Approval.created_at, Approval.id)):
        approvals.setdefault(row.run_id, []).append(row)
    return [_run(r, trials.get(r.challenger_trial_id or ""), approvals.get(r.id, [])) for r in rows]


def _run(row: Run, trial: Trial | None, approvals: list[Approval]) -> RunBody:
    config = row.config
    metrics = row.metrics or {}
    objective = (config.get("trainingApproach") or {}).get("objective") or {}
    hyperparameters = sorted((trial.hyperparameters if trial else {}).items())
    return RunBody(
        id=row.id, slug=_slug(str(config.get("name", "")), row.id), model_id=row.model_id, account_id=row.account_id,
        status=STATUS.get(row.status, "failed"), error=_error(row),
        deploy_status=DEPLOY_STATUS.get(row.deploy_status, (row.deploy_status or "").lower()),
        deploy_error=row.deploy_error, start=millis(row.created_at) or 0, end=millis(row.ended_at),
        hyperparameters=[Parameter(name=k, value=str(v)) for k, v in hyperparameters],
        champion_id=row.champion_run_id,
        metrics=RunMetrics(
            challenger=_test_metrics(metrics.get("challenger")) + _training_metrics(trial, objective),
            champion=_test_metrics(metrics.get("champion")),
        ),
        approvals=[approval(a) for a in approvals],
        problem_definition=ProblemDefinition.model_validate(config["problemDefinition"]),
        training_approach=TrainingApproach.model_validate(config["trainingApproach"]),
        deploy_approach=DeployApproach.model_validate(config["deployApproach"]),
    )
