"""Runs and their state machine; every change writes its event in the same transaction.

PENDING → CURATING → TUNING → EVALUATING → COMPLETED, or FAILED (step, reason) / CANCELLED.
Steps are idempotent: a redelivered message finds the state moved on and only re-enqueues.
"""

from __future__ import annotations

import logging
import traceback
from enum import Enum
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml import events
from pml.app import App
from pml.errors import FailedPrecondition, InvalidArgument, NotFound, PmlError, require_id
from pml.models import get_model
from pml.store.tables import Approval, Run, utcnow

log = logging.getLogger(__name__)


class RunStatus(str, Enum):
    PENDING = "PENDING"
    CURATING = "CURATING"
    TUNING = "TUNING"
    EVALUATING = "EVALUATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = {RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value}


def create_run(session: Session, account_id: str, model_id: str) -> Run:
    """A run takes a copy of the model's config: later edits never change a running run."""
    model = get_model(session, account_id, model_id)
    run = Run(account_id=account_id, model_id=model.id, config=dict(model.config))
    session.add(run)
    session.flush()
    events.publish(session, account_id, "run.state", run_id=run.id, model_id=model.id, data={"status": run.status})
    return run


def get_run(session: Session, account_id: str, run_id: str, *, for_update: bool = False) -> Run:
    require_id("run_id", run_id)
    query = select(Run).where(Run.account_id == account_id, Run.id == run_id)
    if for_update:
        query = query.with_for_update()
    run = session.scalar(query)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


def list_runs(session: Session, account_id: str, model_id: str | None = None) -> list[Run]:
    query = select(Run).where(Run.account_id == account_id)
    if model_id:
        query = query.where(Run.model_id == model_id)
    return list(session.scalars(query.order_by(Run.created_at)))


def set_status(session: Session, run: Run, status: RunStatus, **data: Any) -> None:
    run.status = status.value
    if status.value in TERMINAL:
        run.ended_at = utcnow()
    events.publish(
        session, run.account_id, "run.state", run_id=run.id, model_id=run.model_id,
        data={"status": status.value, **data},
    )


def fail_run(app: App, account_id: str, run_id: str, step: str, reason: str) -> None:
    with app.session() as session:
        run = get_run(session, account_id, run_id, for_update=True)
        if run.status in TERMINAL:
            return
        run.failed_step = step
        run.failure_reason = reason[:4000]
        set_status(session, run, RunStatus.FAILED, step=step, reason=run.failure_reason)


def internal_failure_reason(step: str, run_id: str, exc: BaseException) -> str:
    """What a run says when a bug ended it: the step and the exception's type, never its
    message, which may quote record content (the reason is published in events and webhooks)."""
    return f"internal error in the {step} step ({type(exc).__name__}); see the worker log for run {run_id}"


def log_internal_failure(step: str, run_id: str, exc: BaseException) -> None:
    """Log a bug's type and frames for the operator, without its message (it may hold PHI)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("step %s of run %s failed with %s (message withheld: it may quote records)\n%s",
              step, run_id, type(exc).__name__, frames)


def run_step(app: App, account_id: str, run_id: str, step: str, work: Callable[[], bool]) -> bool:
    """Do one step; a pml error fails the run with its own (safe) message, any other
    exception (a bug) with :func:`internal_failure_reason`.

    Returns whether the next step should be enqueued.
    """
    try:
        return work()
    except NotFound:
        log.warning("run %s of account %s vanished during %s", run_id, account_id, step)
    except PmlError as exc:  # StepFailed and the rest: messages pml wrote, with ids and fields only
        fail_run(app, account_id, run_id, step, str(exc))
    except Exception as exc:  # a bug must not leave the run stuck
        log_internal_failure(step, run_id, exc)
        fail_run(app, account_id, run_id, step, internal_failure_reason(step, run_id, exc))
    return False


def cancel_run(session: Session, account_id: str, run_id: str) -> Run:
    run = get_run(session, account_id, run_id, for_update=True)
    if run.status in TERMINAL:
        raise FailedPrecondition(f"run {run_id} is {run.status} and cannot be cancelled")
    set_status(session, run, RunStatus.CANCELLED)
    return run


def approve_run(
    session: Session, account_id: str, run_id: str, decision: str, description: str = "", user: str = "",
    *, actor: str = "",
) -> tuple[Approval, bool]:
    """Record a decision. Approving makes the run's model the champion.

    Returns the approval and whether a cloud deployment must follow.
    """
    if decision not in ("approved", "rejected"):
        raise InvalidArgument([("decision", f"must be 'approved' or 'rejected', not {decision!r}")])
    run = get_run(session, account_id, run_id, for_update=True)
    if run.status != RunStatus.COMPLETED.value:
        raise FailedPrecondition(f"run {run_id} is {run.status}; only a COMPLETED run can be approved")
    earlier = session.scalar(select(Approval).where(Approval.account_id == account_id, Approval.run_id == run.id))
    if earlier is not None:
        raise FailedPrecondition(f"run {run_id} was already {earlier.decision}; a decision is final (start a new run)")
    approval = Approval(
        account_id=account_id, run_id=run.id, decision=decision, description=description, user=user, actor=actor
    )
    session.add(approval)
    deploy = False
    if decision == "approved":
        model = get_model(session, account_id, run.model_id)
        model.champion_run_id = run.id
        deploy = (run.config.get("deployApproach") or {}).get("type", "cloud") == "cloud"
        run.deploy_status = "PENDING" if deploy else "NOT_DEPLOYED"
    session.flush()
    events.publish(
        session, account_id, "run.approval", run_id=run.id, model_id=run.model_id,
        data={"decision": decision, "approvalId": approval.id},
    )
    return approval, deploy


def list_approvals(session: Session, account_id: str, run_id: str) -> list[Approval]:
    get_run(session, account_id, run_id)
    query = select(Approval).where(Approval.account_id == account_id, Approval.run_id == run_id)
    return list(session.scalars(query.order_by(Approval.created_at, Approval.id)))
