"""The commands every interface offers (gRPC, HTTP, CLI), each one audited.

An interface authenticates the caller, calls one function here and converts the answer; the
transaction, the follow-up step on the broker and the audit entry live here, once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pml import accounts, audit, models, runs, webhooks
from pml.app import App
from pml.errors import PmlError
from pml.serving import deploy
from pml.serving.predict import ModelArtifact, Prediction, artifact_for
from pml.serving.predict import predict as _predict
from pml.store.tables import Account, ApiKey, Approval, Model, Run, WebhookSubscription

ADMIN = "admin"
# The actor of a call refused for its credentials; the key it presented is never logged.
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the account it acts in, the actor for the audit log, the interface."""

    account_id: str
    actor: str
    """``key:<api key id>`` for an account's key, ``admin`` for the operator's admin key
    (also the operator at the CLI, which uses the store directly), ``unknown`` when refused."""
    interface: str
    """``grpc``, ``http``, ``cli`` (or ``worker`` for the deployer's own entries)."""

    @classmethod
    def for_key(cls, account_id: str, key_id: str, interface: str) -> "Caller":
        return cls(account_id=account_id, actor=f"key:{key_id}", interface=interface)

    @classmethod
    def admin(cls, account_id: str, interface: str) -> "Caller":
        return cls(account_id=account_id, actor=ADMIN, interface=interface)


@dataclass
class Target:
    """The object a command acts on; a create fills in the new object's id."""

    id: str = ""


@contextmanager
def audited(app: App, caller: Caller, action: str, target_type: str, target_id: str = "") -> Iterator[Target]:
    """Run a command and write its audit entry (in its own transaction, so failures count)."""
    target = Target(target_id)
    outcome = "INTERNAL"
    try:
        yield target
        outcome = "ok"
    except PmlError as exc:
        outcome = exc.code
        raise
    finally:
        with app.session() as session:
            audit.record(
                session, account_id=caller.account_id, actor=caller.actor, action=action,
                target_type=target_type, target_id=target.id, outcome=outcome, interface=caller.interface,
            )


def record_refusal(app: App, caller: Caller, action: str, target_type: str, target_id: str, error: PmlError) -> None:
    """Audit a call refused before it ran (no, unknown or non-admin credentials): attempts on
    the admin calls are what an operator looks for first."""
    with app.session() as session:
        audit.record(
            session, account_id=caller.account_id, actor=caller.actor, action=action,
            target_type=target_type, target_id=target_id, outcome=error.code, interface=caller.interface,
        )


# ---- accounts (admin) --------------------------------------------------------------------


def create_account(app: App, caller: Caller, name: str, fhir_source: dict[str, Any]) -> Account:
    with audited(app, caller, "account.create", "account", caller.account_id), app.session() as session:
        return accounts.create_account(session, caller.account_id, name, fhir_source)


def create_api_key(app: App, caller: Caller, name: str) -> tuple[ApiKey, str]:
    with audited(app, caller, "apikey.create", "apikey") as target, app.session() as session:
        key, plaintext = accounts.create_api_key(session, caller.account_id, name)
        target.id = key.id
        return key, plaintext


def revoke_api_key(app: App, caller: Caller, key_id: str) -> ApiKey:
    with audited(app, caller, "apikey.revoke", "apikey", key_id), app.session() as session:
        return accounts.revoke_api_key(session, caller.account_id, key_id)


# ---- models ------------------------------------------------------------------------------


def create_model(app: App, caller: Caller, data: Any) -> Model:
    with audited(app, caller, "model.create", "model") as target, app.session() as session:
        model = models.create_model(session, caller.account_id, data)
        target.id = model.id
        return model


def update_model(app: App, caller: Caller, model_id: str, data: Any) -> Model:
    with audited(app, caller, "model.update", "model", model_id), app.session() as session:
        return models.update_model(session, caller.account_id, model_id, data)


def delete_model(app: App, caller: Caller, model_id: str) -> None:
    """A deleted model's deployment is stopped with it: nothing can reach it any more."""
    with audited(app, caller, "model.delete", "model", model_id):
        with app.session() as session:
            models.delete_model(session, caller.account_id, model_id)
            retired = deploy.retire_model_deployments(session, caller.account_id, model_id)
        deploy.stop_retired(retired)


# ---- runs and approvals ------------------------------------------------------------------


def create_run(app: App, caller: Caller, model_id: str) -> Run:
    with audited(app, caller, "run.create", "run") as target:
        with app.session() as session:
            run = runs.create_run(session, caller.account_id, model_id)
            target.id = run.id
        app.enqueue("curate", caller.account_id, run.id)  # after commit: the worker must see the row
        return run


def cancel_run(app: App, caller: Caller, run_id: str) -> Run:
    with audited(app, caller, "run.cancel", "run", run_id), app.session() as session:
        return runs.cancel_run(session, caller.account_id, run_id)


def approve_run(app: App, caller: Caller, run_id: str, decision: str, description: str = "", user: str = "") -> Approval:
    """Record the decision; an approved cloud model is deployed by the deployer."""
    with audited(app, caller, f"run.{'approve' if decision == 'approved' else 'reject'}", "run", run_id):
        with app.session() as session:
            approval, deploy = runs.approve_run(
                session, caller.account_id, run_id, decision, description, user, actor=caller.actor
            )
        if deploy:
            app.enqueue("deploy", caller.account_id, run_id)
        return approval


# ---- predictions and artifacts -----------------------------------------------------------


def predict(app: App, caller: Caller, model_id: str, *, example_id: str | None = None,
            image: bytes | None = None) -> Prediction:
    with audited(app, caller, "model.predict", "model", model_id):
        return _predict(app, caller.account_id, model_id, example_id=example_id, image=image)


def open_artifact(app: App, caller: Caller, model_id: str, run_id: str | None = None) -> ModelArtifact:
    """The run's artifact, or the model champion's."""
    with audited(app, caller, "artifact.download", "run" if run_id else "model", run_id or model_id):
        return artifact_for(app, caller.account_id, model_id, run_id)


# ---- webhooks ----------------------------------------------------------------------------


def create_subscription(app: App, caller: Caller, url: str, event_types: list[str]) -> WebhookSubscription:
    """A new webhook subscription; its secret is on the returned row (shown to the caller once)."""
    with audited(app, caller, "webhook.create", "webhook") as target, app.session() as session:
        row = webhooks.create_subscription(session, caller.account_id, url, event_types)
        target.id = row.id
        return row


def delete_subscription(app: App, caller: Caller, subscription_id: str) -> None:
    with audited(app, caller, "webhook.delete", "webhook", subscription_id), app.session() as session:
        webhooks.delete_subscription(session, caller.account_id, subscription_id)
