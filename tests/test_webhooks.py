"""Webhooks: signed POSTs of a run's events to a real local receiver, retries, failures, the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from pml import events
from pml.app import App
from pml.client import PmlClient
from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.gateway.server import build_server
from pml.settings import Settings
from pml.v1 import pml_pb2 as pb
from pml.workers import start_workers
from tests.conftest import Stack, wait_for
from tests.test_gateway_errors import field_violations

DELIVERY_TIMEOUT_S = 60


class Receiver:
    """A real HTTP endpoint on loopback; answers each path with the statuses queued for it, then 200."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                queued = receiver.answers.get(self.path) or []
                self.send_response(queued.pop(0) if queued else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Any:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fhir")
    write_demo_fhir(folder)
    return folder


def verify(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """What a receiver does: check the signature of the exact body, then parse it."""
    expected = "sha256=" + hmac.new(secret.encode(), request["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request["headers"]["X-Pml-Signature"], expected), "bad signature"
    return json.loads(request["body"])


def subscribe(client: PmlClient, url: str, types: list[str]) -> pb.Subscription:
    return client.create_webhook(url, types)


def deliveries(client: PmlClient, subscription_id: str, state: str = "") -> list[pb.Delivery]:
    return client.list_deliveries(subscription_id, state)


def publish(app: App, account_id: str, type: str = "trial.metric", **data: Any) -> int:
    with app.session() as session:
        row = events.publish(session, account_id, type, data=data)
    return row.id


def test_a_runs_events_are_posted_signed_and_filtered_by_type(
    stack: Stack, small_folder: Path, receiver: Receiver,
) -> None:
    client = stack.new_account(small_folder)
    sub = subscribe(client, receiver.url + "/run", ["run.state"])
    model = client.create_model(digits_config("imgClf", train_image="registry.example/unknown:1"))
    run_id = client.create_run(model.id).id
    for _ in client.watch_run(run_id):
        pass

    def final_state_posted() -> bool:
        return any(json.loads(r["body"])["data"].get("status") == "FAILED" for r in receiver.at("/run"))

    wait_for(final_state_posted, DELIVERY_TIMEOUT_S, "the FAILED state's webhook")
    bodies = sorted((verify(sub.secret, r) for r in receiver.at("/run")), key=lambda b: b["id"])
    assert [b["data"]["status"] for b in bodies] == ["PENDING", "CURATING", "TUNING", "FAILED"]
    assert {b["type"] for b in bodies} == {"run.state"}, "the subscription's type filter"
    assert all(b["runId"] == run_id and b["modelId"] == model.id and b["time"] for b in bodies)
    for request in receiver.at("/run"):
        body = json.loads(request["body"])
        assert request["headers"]["X-Pml-Event-Id"] == str(body["id"])
        assert request["headers"]["X-Pml-Event-Type"] == "run.state"
        assert set(body) == {"id", "type", "runId", "modelId", "data", "time"}
    history = [e.id for e in client.watch_run(run_id) if e.type == "run.state"]
    assert [b["id"] for b in bodies] == history
    listed = deliveries(client, sub.id)
    assert sorted(d.event_id for d in listed) == history
    assert all(d.state == "DELIVERED" and d.attempts == 1 and d.last_status_code == 200 for d in listed), listed


def test_a_receiver_that_fails_first_gets_the_event_again(stack: Stack, small_folder: Path, receiver: Receiver) -> None:
    client = stack.new_account(small_folder)
    receiver.answers["/flaky"] = [500]
    sub = subscribe(client, receiver.url + "/flaky", ["trial.metric"])
    event_id = publish(stack.app, client.account, step=1)
    publish(stack.app, client.account, "trial.finished", status="COMPLETED")  # not subscribed
    delivered = wait_for(lambda: deliveries(client, sub.id, "DELIVERED"), DELIVERY_TIMEOUT_S, "the retried delivery")
    assert len(delivered) == 1 and delivered[0].event_id == event_id
    assert delivered[0].attempts == 2 and delivered[0].last_status_code == 200 and not delivered[0].last_error
    posts = receiver.at("/flaky")
    assert len(posts) == 2 and posts[0]["body"] == posts[1]["body"], "the same signed body, twice"
    assert verify(sub.secret, posts[1])["id"] == event_id


def test_a_dead_url_ends_failed_with_the_error_visible(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sub = subscribe(client, dead, [])
    event_id = publish(stack.app, client.account, step=1)
    failed = wait_for(lambda: deliveries(client, sub.id, "FAILED"), DELIVERY_TIMEOUT_S, "the delivery to give up")
    assert len(failed) == 1 and failed[0].event_id == event_id
    assert failed[0].attempts == 3, "PML_WEBHOOK_MAX_ATTEMPTS of the test workers"
    assert "ConnectError" in failed[0].last_error and failed[0].last_status_code == 0
    assert not failed[0].HasField("delivered_time") and not failed[0].HasField("next_attempt_time")
    assert deliveries(client, sub.id, "DELIVERED") == []


def test_subscriptions_are_validated_scoped_and_their_secret_shown_once(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    stranger = stack.new_account(small_folder)
    for url, field in (("ftp://example.org/x", "url"), ("example.org/hook", "url"), ("", "url"),
                       ("https://user:pw@example.org/", "url"), ("https://:80/", "url")):
        with pytest.raises(grpc.RpcError) as caught:
            subscribe(client, url, [])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert field in field_violations(caught.value), url
    with pytest.raises(grpc.RpcError) as caught:
        subscribe(client, "https://example.org/hook", ["run.state", "run.sate"])
    assert "event_types[1]" in field_violations(caught.value)

    sub = subscribe(client, "https://example.org/hook", ["run.state"])
    assert len(sub.secret) == 64 and sub.id
    fetched = client.webhooks.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub.id),
                                              metadata=client.metadata)
    assert fetched.secret == "" and fetched.url == sub.url and list(fetched.event_types) == ["run.state"]
    listed = client.webhooks.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=client.metadata)
    assert [s.id for s in listed.subscriptions] == [sub.id] and all(not s.secret for s in listed.subscriptions)
    for call in (
        lambda: stranger.webhooks.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub.id),
                                                  metadata=stranger.metadata),
        lambda: deliveries(stranger, sub.id),
        lambda: stranger.webhooks.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id=sub.id),
                                                     metadata=stranger.metadata),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        deliveries(client, sub.id, "LOST")
    assert "state" in field_violations(caught.value)

    client.webhooks.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id=sub.id), metadata=client.metadata)
    with pytest.raises(grpc.RpcError) as caught:
        client.webhooks.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub.id), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    audit = client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(), metadata=client.metadata).entries
    actions = [(e.action, e.target_id, e.outcome) for e in audit if e.action.startswith("webhook.")]
    assert ("webhook.create", sub.id, "ok") in actions and ("webhook.delete", sub.id, "ok") in actions
    assert ("webhook.create", "", "INVALID_ARGUMENT") in actions


def test_embedded_mode_delivers_webhooks_without_redis(tmp_path: Path, receiver: Receiver) -> None:
    admin_key = secrets.token_urlsafe(16)
    app = App(Settings(home=tmp_path / "home", admin_key=admin_key, webhook_backoff_s=0.1))
    server, port = build_server(app, "127.0.0.1:0")
    worker = start_workers(app, queues={"notify"})
    try:
        admin = PmlClient(f"127.0.0.1:{port}", admin_key=admin_key)
        admin.create_account("embedded", {"type": "folder", "path": str(tmp_path)})
        client = PmlClient(f"127.0.0.1:{port}", account="embedded", api_key=admin.create_api_key("embedded"))
        receiver.answers["/embedded"] = [503]
        sub = subscribe(client, receiver.url + "/embedded", ["trial.metric"])
        event_id = publish(app, "embedded", step=3)
        delivered = wait_for(lambda: deliveries(client, sub.id, "DELIVERED"), DELIVERY_TIMEOUT_S,
                             "the embedded delivery")
        assert delivered[0].event_id == event_id and delivered[0].attempts == 2
        assert verify(sub.secret, receiver.at("/embedded")[-1])["data"] == {"step": 3}
        admin.close()
        client.close()
    finally:
        worker.stop()
        server.stop(grace=1)
        app.close()
