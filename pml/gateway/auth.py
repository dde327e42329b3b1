"""Who is calling: the account in ``pml-account`` and the bearer key in ``authorization``."""

from __future__ import annotations

import hmac

import grpc

from pml.accounts import authenticate
from pml.app import App
from pml.errors import PermissionDenied, Unauthenticated

ACCOUNT_HEADERS = ("pml-account", "lifeomic-account")


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}


def bearer(metadata: dict[str, str]) -> str:
    value = metadata.get("authorization", "")
    if not value.lower().startswith("bearer "):
        raise Unauthenticated("missing 'authorization: Bearer <key>' metadata")
    return value[7:].strip()


def caller_account(app: App, context: grpc.ServicerContext) -> str:
    metadata = _metadata(context)
    account = next((metadata[h] for h in ACCOUNT_HEADERS if metadata.get(h)), "")
    if not account:
        raise Unauthenticated("missing 'pml-account' metadata")
    key = bearer(metadata)
    with app.session() as session:
        return authenticate(session, account, key)


def require_admin(app: App, context: grpc.ServicerContext) -> None:
    key = bearer(_metadata(context))
    admin = app.settings.admin_key
    if not admin:
        raise PermissionDenied("admin calls are disabled (PML_ADMIN_KEY is not set)")
    if not hmac.compare_digest(key, admin):
        raise PermissionDenied("this call needs the admin key")
