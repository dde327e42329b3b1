"""Trials of an account's runs as the API reads them: rows, and each metric's series.

Kept apart from ``pml.tuning`` so the gateway reads trials without importing Ray.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.errors import NotFound, require_id
from pml.runs import get_run
from pml.store.tables import Trial, TrialMetric
from pml.tuning.metrics import MetricPoint


def get_trial(session: Session, account_id: str, trial_id: str) -> Trial:
    require_id("trial_id", trial_id)
    row = session.scalar(select(Trial).where(Trial.account_id == account_id, Trial.id == trial_id))
    if row is None:
        raise NotFound(f"trial {trial_id} not found")
    return row


def list_trials(session: Session, account_id: str, run_id: str) -> list[Trial]:
    get_run(session, account_id, run_id)
    query = select(Trial).where(Trial.account_id == account_id, Trial.run_id == run_id)
    return list(session.scalars(query.order_by(Trial.number, Trial.id)))


def trial_metric_series(session: Session, account_id: str, trial_id: str) -> dict[str, list[MetricPoint]]:
    """A finished trial's metric series by metric name, in step order (for the API's charts)."""
    rows = session.scalars(
        select(TrialMetric).where(TrialMetric.account_id == account_id, TrialMetric.trial_id == trial_id)
        .order_by(TrialMetric.metric, TrialMetric.step)
    )
    out: dict[str, list[MetricPoint]] = {}
    for row in rows:
        out.setdefault(row.metric, []).append(MetricPoint(step=row.step, value=row.value, time=row.reported_at.timestamp()))
    return out
