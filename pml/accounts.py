"""Accounts (tenants) and their API keys. Keys are random, shown once and stored hashed."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated, require_id
from pml.store.tables import Account, ApiKey, utcnow

ACCOUNT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
KEY_PREFIX = "pml_"


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_fhir_source(source: dict[str, Any]) -> dict[str, Any]:
    """Validate an account's FHIR source setting; the checked copy is what gets stored.

    - ``{"type": "folder", "path": "/data/fhir"}``
    - ``{"type": "server", "baseUrl": "https://fhir.example/r4", "token": "...",
      "mode": "search" | "bulk", "pageSize": 100}``

    Both take ``attachmentHosts``: hosts that http(s) attachment URLs may reach.
    """
    kind = source.get("type")
    known = {"type", "attachmentHosts"} | ({"path"} if kind == "folder" else {"baseUrl", "token", "mode", "pageSize"})
    unknown = sorted(set(source) - known)
    if unknown:
        raise InvalidArgument([(f"fhirSource.{name}", "unknown field") for name in unknown])
    hosts = source.get("attachmentHosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise InvalidArgument([("fhirSource.attachmentHosts", "must be a list of host names")])
    if kind == "folder":
        path = source.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidArgument([("fhirSource.path", "a folder source needs a path")])
        if not Path(path).is_absolute():
            raise InvalidArgument([("fhirSource.path", "must be an absolute path (workers run elsewhere)")])
        if not Path(path).is_dir():
            raise InvalidArgument([("fhirSource.path", f"{path} is not a folder")])
        return {"type": kind, "path": path, "attachmentHosts": hosts}
    if kind == "server":
        base = source.get("baseUrl")
        if not isinstance(base, str) or urlparse(base).scheme not in ("http", "https") or not urlparse(base).netloc:
            raise InvalidArgument([("fhirSource.baseUrl", "a server source needs an http(s) base URL")])
        mode = source.get("mode", "search")
        if mode not in ("search", "bulk"):
            raise InvalidArgument([("fhirSource.mode", "must be 'search' or 'bulk'")])
        page_size = source.get("pageSize", 100)
        if not isinstance(page_size, int) or not 1 <= page_size <= 1000:
            raise InvalidArgument([("fhirSource.pageSize", "must be an integer from 1 to 1000")])
        token = source.get("token")
        if token is not None and not isinstance(token, str):
            raise InvalidArgument([("fhirSource.token", "must be a string")])
        out = {"type": kind, "baseUrl": base, "mode": mode, "pageSize": page_size, "attachmentHosts": hosts}
        if token:
            out["token"] = token
        return out
    raise InvalidArgument([("fhirSource.type", f"unsupported source type {kind!r}; expected 'folder' or 'server'")])


def public_fhir_source(source: dict[str, Any]) -> dict[str, Any]:
    """The setting as shown through the API: the token never leaves the store."""
    return {k: ("***" if k == "token" else v) for k, v in source.items()}


def create_account(session: Session, account_id: str, name: str, fhir_source: dict[str, Any]) -> Account:
    if not ACCOUNT_ID.match(account_id):
        raise InvalidArgument([("accountId", "2-63 characters of a-z, 0-9 and '-', starting with a letter or digit")])
    if session.get(Account, account_id) is not None:
        raise AlreadyExists(f"account {account_id!r} exists already")
    account = Account(id=account_id, name=name or account_id, fhir_source=check_fhir_source(fhir_source))
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, account_id: str) -> Account:
    require_id("account_id", account_id)
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found")
    return account


def create_api_key(session: Session, account_id: str, name: str = "") -> tuple[ApiKey, str]:
    """Make a key; the plaintext is returned once and never stored."""
    get_account(session, account_id)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(account_id=account_id, key_hash=_hash_key(plaintext), name=name)
    session.add(key)
    session.flush()
    return key, plaintext


def authenticate(session: Session, account_id: str, key: str) -> str:
    """The key's id when ``key`` is a live key of ``account_id``; Unauthenticated otherwise."""
    if not account_id or not key:
        raise Unauthenticated("missing account or API key")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == _hash_key(key)))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.account_id, account_id):
        raise Unauthenticated("unknown or revoked API key for this account")
    return row.id


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).order_by(Account.created_at, Account.id)))


def list_api_keys(session: Session, account_id: str) -> list[ApiKey]:
    get_account(session, account_id)
    query = select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.created_at, ApiKey.id)
    return list(session.scalars(query))


def revoke_api_key(session: Session, account_id: str, key_id: str) -> ApiKey:
    require_id("key_id", key_id)
    row = session.scalar(select(ApiKey).where(ApiKey.account_id == account_id, ApiKey.id == key_id))
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is not None:
        raise FailedPrecondition(f"API key {key_id} is revoked already")
    row.revoked_at = utcnow()
    session.flush()
    return row
