"""Tables of the store. Every tenant row carries ``account_id`` and every query filters on it."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime(timezone=True)}


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    fhir_source: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Image(Base):
    """The image registry: an image URI and where the process runtime finds its entry points.

    Operator-level (set with ``pml images add``), not per account: images hold code, not data.
    """

    __tablename__ = "images"
    uri: Mapped[str] = mapped_column(String(500), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # "process" (a local folder) or "docker"
    path: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    champion_run_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Deleted models stay for their runs' history and the audit log; the API no longer sees them.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the model's config when the run was created
    status: Mapped[str] = mapped_column(String(20), default="PENDING")
    failed_step: Mapped[str | None] = mapped_column(String(20), default=None)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    curation_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    challenger_trial_id: Mapped[str | None] = mapped_column(String(64), default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    champion_run_id: Mapped[str | None] = mapped_column(String(32), default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    deploy_status: Mapped[str | None] = mapped_column(String(20), default=None)
    deploy_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Trial(Base):
    """One candidate. ``status``: RUNNING, COMPLETED, FAILED (reason in ``failure_reason``),
    STOPPED_EARLY (by the early-stopping rule; reason says which) or STOPPED (the experiment
    ended first: run cancelled, or the failed-trial budget spent)."""

    __tablename__ = "trials"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "<run id>-<ray trial id>"
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="RUNNING")
    objective: Mapped[float | None] = mapped_column(Float, default=None)
    final_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)
    folder: Mapped[str] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class TrialMetric(Base):
    """One match of a metric's regex in a trial's log: the series the API charts.

    The last step of each metric is the trial's final value (``Trial.final_metrics``).
    """

    __tablename__ = "trial_metrics"
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trial_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    metric: Mapped[str] = mapped_column(String(200), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    reported_at: Mapped[dt.datetime] = mapped_column()


class Snapshot(Base):
    __tablename__ = "snapshots"
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the canonical manifest
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SnapshotExample(Base):
    __tablename__ = "snapshot_examples"
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    snapshot_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    example_id: Mapped[str] = mapped_column(String(200), primary_key=True)  # DocumentReference id
    patient_id: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(20))
    image_sha256: Mapped[str] = mapped_column(String(64))
    mask_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    labels: Mapped[list[Any]] = mapped_column(JSON)
    __table_args__ = (Index("ix_snapshot_examples_example", "account_id", "example_id"),)


class Approval(Base):
    __tablename__ = "approvals"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    decision: Mapped[str] = mapped_column(String(20))  # approved | rejected
    description: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(200), default="")
    actor: Mapped[str] = mapped_column(String(64), default="")  # "key:<id>" or "admin"
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    status: Mapped[str] = mapped_column(String(20), default="STARTING")  # STARTING SERVING STOPPED FAILED
    endpoint: Mapped[str | None] = mapped_column(String(200), default=None)
    pid: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Append-only history of everything that happened; ids order the stream."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    model_id: Mapped[str | None] = mapped_column(String(32), default=None)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only: who did what to which object, and how it ended. Never patient data."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(200), default="")
    outcome: Mapped[str] = mapped_column(String(32))
    interface: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
