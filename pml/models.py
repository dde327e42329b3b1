"""Model configs of an account: create, read, list. A model's labels keep their id and index."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pml import events
from pml.errors import NotFound
from pml.schemas.config import ModelConfig, assign_labels, parse_model_config
from pml.store.tables import Model


def create_model(session: Session, account_id: str, data: Any) -> Model:
    """Validate and save a config; nothing is saved when it is invalid."""
    config = assign_labels(parse_model_config(data))
    model = Model(account_id=account_id, name=config.name, config=config.to_json())
    session.add(model)
    session.flush()
    events.publish(session, account_id, "model.created", model_id=model.id)
    return model


def get_model(session: Session, account_id: str, model_id: str) -> Model:
    model = session.scalar(select(Model).where(Model.account_id == account_id, Model.id == model_id))
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


def list_models(session: Session, account_id: str) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.account_id == account_id).order_by(Model.created_at)))


def model_config(model: Model) -> ModelConfig:
    return ModelConfig.model_validate(model.config)
