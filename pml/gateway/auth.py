"""Who is calling: the account in ``pml-account`` and the bearer key in ``authorization``."""

from __future__ import annotations

import hmac

import grpc

from pml.accounts import authenticate
from pml.app import App
from pml.commands import UNKNOWN, Caller, record_refusal
from pml.errors import PermissionDenied, Unauthenticated

# `lifeomic-account` is what clients of the public Patient ML Service API send.
ACCOUNT_HEADERS = ("pml-account", "lifeomic-account")


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}


def bearer_key(authorization: str) -> str:
    if not authorization.lower().startswith("bearer "):
        raise Unauthenticated("missing 'authorization: Bearer <key>'")
    return authorization[7:].strip()


def account_caller(app: App, account: str, authorization: str, interface: str) -> Caller:
    """Authenticate an account's API key (any interface)."""
    if not account:
        raise Unauthenticated("missing account: send it in the 'pml-account' (or 'LifeOmic-Account') header")
    key = bearer_key(authorization)
    with app.session() as session:
        return Caller.for_key(account, authenticate(session, account, key), interface)


def check_admin(app: App, authorization: str) -> None:
    key = bearer_key(authorization)
    admin = app.settings.admin_key
    if not admin:
        raise PermissionDenied("admin calls are disabled (PML_ADMIN_KEY is not set)")
    if not hmac.compare_digest(key, admin):
        raise PermissionDenied("this call needs the admin key")


def caller(app: App, context: grpc.ServicerContext) -> Caller:
    metadata = _metadata(context)
    account = next((metadata[h] for h in ACCOUNT_HEADERS if metadata.get(h)), "")
    return account_caller(app, account, metadata.get("authorization", ""), "grpc")


def admin_caller(app: App, context: grpc.ServicerContext, account_id: str, action: str) -> Caller:
    """The operator, acting on ``account_id`` (the account the audit entry belongs to).

    A refused attempt is audited as ``action`` on that account, by ``unknown``.
    """
    try:
        check_admin(app, _metadata(context).get("authorization", ""))
    except (Unauthenticated, PermissionDenied) as exc:
        record_refusal(app, Caller(account_id, UNKNOWN, "grpc"), action, "account", account_id, exc)
        raise
    return Caller.admin(account_id, "grpc")
