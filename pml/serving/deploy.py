"""The deploy step: serve an approved champion with zero downtime.

The new server starts and must pass its health check before predictions switch to it;
only then is the old one stopped. With the process runtime a deployment lives as long as
the worker process that started it; a docker deployment outlives it. Each deployment's
outcome is an audit entry (``run.deploy``) in the transaction that records it.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml import audit, events
from pml.app import App
from pml.artifacts import unpack_model
from pml.errors import NotFound, PmlError
from pml.images import resolve_image
from pml.models import get_model
from pml.runs import get_run
from pml.runtimes import InferenceServer, runtime_for, stop_server_elsewhere
from pml.serving.client import forget
from pml.store.tables import Approval, Deployment, utcnow

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 120.0
# The audit actor of a deployment that no approval asked for (there is none today).
SYSTEM_ACTOR = "system"

# Servers this process started, by deployment id, so it can stop them when replaced.
_servers: dict[str, InferenceServer] = {}
# A deployment taken out of service: (deployment id, pid, endpoint), what stopping it needs.
Retired = tuple[str, int | None, str | None]


def _stop(deployment_id: str, pid: int | None, endpoint: str | None) -> None:
    server = _servers.pop(deployment_id, None)
    if server is not None:
        server.stop()
        forget(server.endpoint)
    else:
        stop_server_elsewhere(endpoint or "", pid)  # started by another worker on this host


def _approver(session: Session, account_id: str, run_id: str) -> str:
    """Who asked for the deployment: the actor of the run's approval (``key:<id>``, ``admin``)."""
    actor = session.scalar(
        select(Approval.actor).where(
            Approval.account_id == account_id, Approval.run_id == run_id, Approval.decision == "approved"
        )
    )
    return actor or SYSTEM_ACTOR


def _audit_deploy(session: Session, account_id: str, run_id: str, outcome: str) -> None:
    """The deploy's audit entry: the worker carries out what the approver asked for."""
    audit.record(
        session, account_id=account_id, actor=_approver(session, account_id, run_id), action="run.deploy",
        target_type="run", target_id=run_id, outcome=outcome, interface="worker",
    )


def _model_exists(session: Session, account_id: str, model_id: str) -> bool:
    try:
        get_model(session, account_id, model_id)
    except NotFound:
        return False
    return True


def retire_model_deployments(session: Session, account_id: str, model_id: str) -> list[Retired]:
    """Mark a deleted model's serving and starting deployments stopped (in the caller's
    transaction); returns what :func:`stop_retired` must stop once that has committed."""
    rows = list(session.scalars(select(Deployment).where(
        Deployment.account_id == account_id, Deployment.model_id == model_id,
        Deployment.status.in_(("SERVING", "STARTING")),
    )))
    for row in rows:
        row.status, row.updated_at = "STOPPED", utcnow()
        run = get_run(session, account_id, row.run_id)
        run.deploy_status = "STOPPED"
        events.publish(session, account_id, "deployment.stopped", run_id=row.run_id, model_id=model_id,
                       data={"deploymentId": row.id, "reason": "model deleted"})
    return [(row.id, row.pid, row.endpoint) for row in rows]


def stop_retired(stopped: list[Retired]) -> None:
    for deployment_id, pid, endpoint in stopped:
        _stop(deployment_id, pid, endpoint)


def abandon_interrupted_starts(session: Session) -> list[Retired]:
    """Deployments left STARTING by a process that died (all accounts): marked FAILED, and
    returned for :func:`stop_retired`, whose server may still be up. Only for a process
    that knows no deploy step is running (an embedded pml at start)."""
    rows = list(session.scalars(select(Deployment).where(Deployment.status == "STARTING")))
    for row in rows:
        row.status, row.error, row.updated_at = "FAILED", "interrupted: pml stopped while the server started", utcnow()
    return [(row.id, row.pid, row.endpoint) for row in rows]


def deploy_run(app: App, account_id: str, run_id: str) -> None:
    """Deploy an approved run's model if it is still the champion; idempotent."""
    with app.session() as session:
        run = get_run(session, account_id, run_id)
        try:
            model = get_model(session, account_id, run.model_id)
        except NotFound:
            log.info("run %s: its model was deleted before the deployment; nothing to deploy", run_id)
            return
        if model.champion_run_id != run.id:
            if run.deploy_status != "SUPERSEDED":
                events.publish(session, account_id, "deployment.superseded", run_id=run_id, model_id=model.id,
                               data={"championRunId": model.champion_run_id})
            run.deploy_status = "SUPERSEDED"
            return
        serving = session.scalar(
            select(Deployment).where(
                Deployment.account_id == account_id, Deployment.model_id == model.id,
                Deployment.run_id == run.id, Deployment.status == "SERVING",
            )
        )
        if serving is not None and serving.id in _servers and _servers[serving.id].alive():
            return  # a redelivered message: already serving
        image_uri = run.config["deployApproach"]["inferenceImage"]
        artifact = run.artifact_sha256
        deployment = Deployment(account_id=account_id, model_id=model.id, run_id=run.id)
        session.add(deployment)
        run.deploy_status = "DEPLOYING"
        session.flush()
        deployment_id, model_id = deployment.id, model.id
        events.publish(session, account_id, "deployment.deploying", run_id=run_id, model_id=model_id,
                       data={"deploymentId": deployment_id})
    home = app.account_home(account_id)
    try:
        with app.session() as session:
            image = resolve_image(session, image_uri)
        assert artifact is not None
        model_dir = unpack_model(app.blobs(account_id), artifact, home / "models")
        server = runtime_for(image.kind).start_server(
            image, model_dir, home / "logs" / f"deploy-{deployment_id}.log", outlive_owner=True
        )
        with app.session() as session:  # before the wait: a crash now must not leave it unknown
            row = session.get(Deployment, deployment_id)
            assert row is not None
            row.endpoint, row.pid, row.updated_at = server.endpoint, server.pid, utcnow()
        server.wait_healthy(HEALTH_TIMEOUT_S)
    except PmlError as exc:
        with app.session() as session:
            row = session.get(Deployment, deployment_id)
            assert row is not None
            row.status, row.error, row.updated_at = "FAILED", str(exc), utcnow()
            run = get_run(session, account_id, run_id)
            run.deploy_status, run.deploy_error = "FAILED", str(exc)
            events.publish(session, account_id, "deployment.failed", run_id=run_id, model_id=model_id,
                           data={"deploymentId": deployment_id, "reason": str(exc)})
            _audit_deploy(session, account_id, run_id, exc.code)
        return
    except Exception:  # a bug: the message is redelivered, and this attempt is on the record
        with app.session() as session:
            _audit_deploy(session, account_id, run_id, "INTERNAL")
        raise
    _servers[deployment_id] = server
    with app.session() as session:
        if _model_exists(session, account_id, model_id):
            retired = None
        else:  # deleted while the server started: retired as the delete retires the rest
            retired = retire_model_deployments(session, account_id, model_id)
            _audit_deploy(session, account_id, run_id, "FAILED_PRECONDITION")
    if retired is not None:
        stop_retired(retired)
        return
    with app.session() as session:
        old = list(
            session.scalars(
                select(Deployment).where(
                    Deployment.account_id == account_id, Deployment.model_id == model_id,
                    Deployment.status == "SERVING",
                )
            )
        )
        for row in old:
            row.status, row.updated_at = "STOPPED", utcnow()
            events.publish(session, account_id, "deployment.stopped", run_id=row.run_id, model_id=model_id,
                           data={"deploymentId": row.id, "replacedBy": deployment_id})
        new = session.get(Deployment, deployment_id)
        assert new is not None
        new.status, new.endpoint, new.pid, new.updated_at = "SERVING", server.endpoint, server.pid, utcnow()
        run = get_run(session, account_id, run_id)
        run.deploy_status, run.deploy_error = "DEPLOYED", None
        events.publish(session, account_id, "deployment.serving", run_id=run_id, model_id=model_id,
                       data={"deploymentId": deployment_id})
        _audit_deploy(session, account_id, run_id, "ok")
        stopped = [(row.id, row.pid, row.endpoint) for row in old]
    stop_retired(stopped)  # only after the switch: no request meets a stopped server
