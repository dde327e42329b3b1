"""Pick up unfinished work when an embedded pml starts again.

With Redis, a message that a dead worker held comes back by itself (dramatiq requeues it).
The embedded broker keeps its queues in memory, so a restart of ``pml serve`` would leave
every run in flight stuck in its state for good. The store knows better: each unfinished run,
deployment and webhook delivery says which step it waits for, and every step is idempotent
(it finds the state moved on, or resumes — a tuning run restores its Ray Tune experiment), so
sending each its step's message again is safe. A process deployment's server ends with the
process that started it, so a serving deployment whose server no longer answers its health
check is deployed again (the deploy step starts a new server and retires the dead one), and
a deployment the last process left STARTING is failed and its server stopped before its run
is deployed again.

Only for the embedded broker: with Redis, doing this too would run steps twice side by side.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import select

from pml.app import App
from pml.runs import RunStatus
from pml.runtimes.base import answers_ping
from pml.serving import deploy
from pml.store.tables import Deployment, Run, WebhookDelivery, utcnow

log = logging.getLogger(__name__)

# A run's state → the queue of the step it is waiting for or was in the middle of.
STEP_OF_STATE = {
    RunStatus.PENDING.value: "curate",
    RunStatus.CURATING.value: "curate",
    RunStatus.TUNING.value: "tune",
    RunStatus.EVALUATING.value: "evaluate",
}
# Deploy states of a completed run whose deploy step never finished.
UNFINISHED_DEPLOYS = ("PENDING", "DEPLOYING")


@dataclass(frozen=True)
class Resumed:
    """What was sent again, by queue (counts only: ids stay in the store)."""

    curate: int = 0
    tune: int = 0
    evaluate: int = 0
    deploy: int = 0
    notify: int = 0

    @property
    def total(self) -> int:
        return self.curate + self.tune + self.evaluate + self.deploy + self.notify


def resume_unfinished(app: App) -> Resumed:
    """Enqueue the pending step of every unfinished run, deployment and delivery, all accounts,
    and deploy again what should be serving but does not answer."""
    counts = dict.fromkeys(("curate", "tune", "evaluate", "deploy", "notify"), 0)
    with app.session() as session:
        interrupted = deploy.abandon_interrupted_starts(session)
    deploy.stop_retired(interrupted)  # their runs are DEPLOYING: deployed again below
    with app.session() as session:
        runs = session.execute(
            select(Run.account_id, Run.id, Run.status).where(Run.status.in_(list(STEP_OF_STATE))).order_by(Run.created_at)
        ).all()
        deploys = session.execute(
            select(Run.account_id, Run.id).where(
                Run.status == RunStatus.COMPLETED.value, Run.deploy_status.in_(UNFINISHED_DEPLOYS)
            ).order_by(Run.created_at)
        ).all()
        serving = session.execute(
            select(Deployment.account_id, Deployment.run_id, Deployment.endpoint).where(Deployment.status == "SERVING")
        ).all()
        deliveries = session.execute(
            select(WebhookDelivery.account_id, WebhookDelivery.id, WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.state == "PENDING"
            ).order_by(WebhookDelivery.id)
        ).all()
    for account_id, run_id, status in runs:
        queue = STEP_OF_STATE[status]
        app.enqueue(queue, account_id, run_id)
        counts[queue] += 1
    dead = [(account_id, run_id) for account_id, run_id, endpoint in serving if not (endpoint and answers_ping(endpoint))]
    for account_id, run_id in list(deploys) + dead:
        app.enqueue("deploy", account_id, run_id)
        counts["deploy"] += 1
    now = utcnow()
    for account_id, delivery_id, due in deliveries:
        if due is not None and due.tzinfo is None:  # SQLite hands datetimes back naive (UTC)
            due = due.replace(tzinfo=dt.timezone.utc)
        wait_s = (due - now).total_seconds() if due is not None else 0.0
        app.enqueue("notify", account_id, delivery_id, delay_s=wait_s if wait_s > 0 else None)
        counts["notify"] += 1
    resumed = Resumed(**counts)
    if resumed.total:
        log.info("resumed unfinished work: %s", resumed)
    return resumed
