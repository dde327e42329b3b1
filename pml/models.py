"""Model configs of an account: create, read, list, update, delete.

A model's labels keep their id and index for its whole life; runs take their own copy of the
config, so an update never changes a run that exists already.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml import events
from pml.errors import FailedPrecondition, NotFound, require_id
from pml.schemas.config import ModelConfig, assign_labels, parse_model_config
from pml.store.tables import Model, Run, utcnow

# Runs in these states still use their model; deleting it then is refused.
_ACTIVE = ("PENDING", "CURATING", "TUNING", "EVALUATING")


def create_model(session: Session, account_id: str, data: Any) -> Model:
    """Validate and save a config; nothing is saved when it is invalid."""
    config = assign_labels(parse_model_config(data))
    model = Model(account_id=account_id, name=config.name, config=config.to_json())
    session.add(model)
    session.flush()
    events.publish(session, account_id, "model.created", model_id=model.id)
    return model


def get_model(session: Session, account_id: str, model_id: str, *, for_update: bool = False) -> Model:
    require_id("model_id", model_id)
    query = select(Model).where(Model.account_id == account_id, Model.id == model_id, Model.deleted_at.is_(None))
    if for_update:
        query = query.with_for_update()
    model = session.scalar(query)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


def list_models(session: Session, account_id: str) -> list[Model]:
    query = select(Model).where(Model.account_id == account_id, Model.deleted_at.is_(None))
    return list(session.scalars(query.order_by(Model.created_at, Model.id)))


def update_model(session: Session, account_id: str, model_id: str, data: Any) -> Model:
    """Replace a model's config. Labels are matched by name and keep their id and index;
    new labels take the next index never used (``maxLabelIndex``), so a dropped label's
    index is never given to another."""
    model = get_model(session, account_id, model_id, for_update=True)
    config = assign_labels(parse_model_config(data), previous=model_config(model))
    model.config = config.to_json()
    model.name = config.name
    model.updated_at = utcnow()
    session.flush()
    events.publish(session, account_id, "model.updated", model_id=model.id)
    return model


def delete_model(session: Session, account_id: str, model_id: str) -> None:
    """Hide a model from the API; its runs, artifacts and audit history stay."""
    model = get_model(session, account_id, model_id, for_update=True)
    active = session.scalar(
        select(Run.id).where(Run.account_id == account_id, Run.model_id == model_id, Run.status.in_(_ACTIVE)).limit(1)
    )
    if active is not None:
        raise FailedPrecondition(f"model {model_id} has an active run ({active}); cancel it first")
    model.deleted_at = utcnow()
    events.publish(session, account_id, "model.deleted", model_id=model.id)


def model_config(model: Model) -> ModelConfig:
    return ModelConfig.model_validate(model.config)
