"""HTTP client for an inference server that follows the container contract.

``POST /invocations`` takes ``{"instances": [{"id", "image": base64}]}`` and answers
``{"predictions": [...]}`` in the same order (see the README).
"""

from __future__ import annotations

import base64
import threading
from typing import Any

import httpx

from pml.errors import StepFailed

BATCH = 64
TIMEOUT_S = 120.0


_clients: dict[str, httpx.Client] = {}
_lock = threading.Lock()


def _client(endpoint: str) -> httpx.Client:
    """One pooled client per endpoint: predictions reuse their connections."""
    with _lock:
        client = _clients.get(endpoint)
        if client is None:
            client = _clients[endpoint] = httpx.Client(base_url=endpoint, timeout=TIMEOUT_S)
        return client


def forget(endpoint: str) -> None:
    """Drop the pooled client of a stopped server."""
    with _lock:
        client = _clients.pop(endpoint, None)
    if client is not None:
        client.close()


def invoke(endpoint: str, instances: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Predictions for ``(id, image bytes)`` pairs, batched; StepFailed names what went wrong."""
    out: list[dict[str, Any]] = []
    client = _client(endpoint)
    for start in range(0, len(instances), BATCH):
        batch = instances[start : start + BATCH]
        body = {"instances": [{"id": i, "image": base64.b64encode(data).decode()} for i, data in batch]}
        try:
            response = client.post("/invocations", json=body)
        except httpx.HTTPError as exc:
            raise StepFailed(f"inference server did not answer: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise StepFailed(f"inference server answered {response.status_code}: {response.text[:300]}")
        predictions = response.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(batch):
            raise StepFailed("inference server answered a different number of predictions than instances")
        out.extend(predictions)
    return out
