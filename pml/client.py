"""A small Python client for the gRPC gateway (used by the CLI, the demo and the tests)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import grpc

from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

TERMINAL_STATES = {pb.RUN_STATE_COMPLETED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED}
# Pause between two attempts to reconnect a watch to a gateway that went away.
RECONNECT_PAUSE_S = 0.5
T = TypeVar("T")


class ArtifactMismatch(ValueError):
    """The downloaded bytes do not hash to the sha256 the server announced (a corrupt transfer)."""


def all_pages(fetch: Callable[[str], Any], field: str) -> list[Any]:
    """Every item of a paged List call: ``fetch(page_token)`` returns one page."""
    items: list[Any] = []
    token = ""
    while True:
        page = fetch(token)
        items.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return items


def retrying(call: Callable[[], T], for_s: float) -> T:
    """``call()``, called again while the gateway is away (UNAVAILABLE: a restart, a network
    blip) for up to ``for_s`` seconds, so a caller that rides out a restart in a stream does
    not fail on the plain call next to it. Any other error is raised at once."""
    give_up_at = time.monotonic() + for_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up_at:
                raise
        time.sleep(RECONNECT_PAUSE_S)


class PmlClient:
    def __init__(self, target: str, account: str = "", api_key: str = "", admin_key: str = ""):
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        )
        self.account = account
        self.api_key = api_key
        self.admin_key = admin_key
        self.accounts = rpc.AccountServiceStub(self.channel)
        self.models = rpc.ModelServiceStub(self.channel)
        self.runs = rpc.RunServiceStub(self.channel)
        self.events = rpc.EventServiceStub(self.channel)
        self.webhooks = rpc.WebhookServiceStub(self.channel)
        self.audit = rpc.AuditServiceStub(self.channel)
        self.snapshots = rpc.SnapshotServiceStub(self.channel)
        self.approvals = rpc.ApprovalServiceStub(self.channel)
        self.predictions = rpc.PredictionServiceStub(self.channel)
        self.artifacts = rpc.ArtifactServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("pml-account", self.account), ("authorization", f"Bearer {self.api_key}")]

    @property
    def admin_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.admin_key}")]

    def create_account(self, account_id: str, fhir_source: dict[str, Any], name: str = "") -> pb.Account:
        request = pb.CreateAccountRequest(account_id=account_id, name=name, fhir_source_json=json.dumps(fhir_source))
        return self.accounts.CreateAccount(request, metadata=self.admin_metadata)

    def new_api_key(self, account_id: str, name: str = "") -> pb.CreateApiKeyResponse:
        """A new key for the account: its id (to list or revoke it) and the key, shown once."""
        return self.accounts.CreateApiKey(
            pb.CreateApiKeyRequest(account_id=account_id, name=name), metadata=self.admin_metadata
        )

    def create_api_key(self, account_id: str, name: str = "") -> str:
        """Just the new key, for callers that only authenticate with it."""
        return self.new_api_key(account_id, name).api_key

    def create_model(self, config: dict[str, Any]) -> pb.Model:
        return self.models.CreateModel(pb.CreateModelRequest(config_json=json.dumps(config)), metadata=self.metadata)

    def get_model(self, model_id: str) -> pb.Model:
        return self.models.GetModel(pb.GetModelRequest(model_id=model_id), metadata=self.metadata)

    def list_models(self) -> list[pb.Model]:
        return all_pages(
            lambda token: self.models.ListModels(pb.ListModelsRequest(page_token=token), metadata=self.metadata), "models"
        )

    def update_model(self, model_id: str, config: dict[str, Any]) -> pb.Model:
        request = pb.UpdateModelRequest(model_id=model_id, config_json=json.dumps(config))
        return self.models.UpdateModel(request, metadata=self.metadata)

    def delete_model(self, model_id: str) -> None:
        self.models.DeleteModel(pb.DeleteModelRequest(model_id=model_id), metadata=self.metadata)

    def list_runs(self, model_id: str = "") -> list[pb.Run]:
        return all_pages(
            lambda token: self.runs.ListRuns(pb.ListRunsRequest(model_id=model_id, page_token=token), metadata=self.metadata),
            "runs",
        )

    def cancel_run(self, run_id: str) -> pb.Run:
        return self.runs.CancelRun(pb.CancelRunRequest(run_id=run_id), metadata=self.metadata)

    def create_run(self, model_id: str) -> pb.Run:
        return self.runs.CreateRun(pb.CreateRunRequest(model_id=model_id), metadata=self.metadata)

    def get_run(self, run_id: str) -> pb.Run:
        return self.runs.GetRun(pb.GetRunRequest(run_id=run_id), metadata=self.metadata)

    def list_trials(self, run_id: str) -> list[pb.Trial]:
        return all_pages(
            lambda token: self.runs.ListTrials(pb.ListTrialsRequest(run_id=run_id, page_token=token), metadata=self.metadata),
            "trials",
        )

    def watch_run(self, run_id: str, after_event_id: int = 0, reconnect_s: float = 0.0) -> Iterator[pb.Event]:
        """Events of a run until it reaches a terminal state (replay, then live).

        ``reconnect_s``: when the gateway goes away (UNAVAILABLE: restarted, a network blip),
        keep reconnecting for that long with the last event id received, so the caller gets
        every event once, as if nothing had happened. 0: the error is raised at once.

        Resuming after the run's end (``after_event_id`` at or past its terminal event) ends at
        once: a run that has ended is read from its start, quietly up to the id given, so the
        end is seen even when it lies before that id.
        """
        last, give_up_at = after_event_id, None
        while True:
            stream = None
            try:
                ended = self.get_run(run_id).state in TERMINAL_STATES
                stream = self.events.WatchRun(pb.WatchRunRequest(run_id=run_id, after_event_id=0 if ended else last),
                                              metadata=self.metadata)
                for event in stream:
                    terminal = event.type == "run.state" and json.loads(event.data_json).get("status") in (
                        "COMPLETED", "FAILED", "CANCELLED",
                    )
                    if event.id > last:
                        last, give_up_at = event.id, None
                        yield event
                    if terminal:
                        return
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or reconnect_s <= 0:
                    raise
                give_up_at = give_up_at or time.monotonic() + reconnect_s
                if time.monotonic() >= give_up_at:
                    raise
                time.sleep(RECONNECT_PAUSE_S)
            finally:
                if stream is not None:
                    stream.cancel()

    def trial_logs(self, trial_id: str, offset: int = 0, follow: bool = False) -> Iterator[pb.LogLine]:
        """A trial's log lines from a byte offset; ``follow`` waits for new lines until it ends."""
        request = pb.StreamTrialLogsRequest(trial_id=trial_id, offset=offset, follow=follow)
        yield from self.runs.StreamTrialLogs(request, metadata=self.metadata)

    def watch_events(self, types: list[str] | None = None, run_id: str = "", model_id: str = "",
                     after_event_id: int = 0) -> Iterator[pb.Event]:
        """The account's events that match, replay then live, until the caller stops iterating.

        Keep the last id received: reconnecting with it as ``after_event_id`` misses nothing.
        """
        request = pb.WatchEventsRequest(
            filter=pb.EventFilter(types=types or [], run_id=run_id, model_id=model_id), after_event_id=after_event_id
        )
        stream = self.events.WatchEvents(request, metadata=self.metadata)
        try:
            yield from stream
        finally:
            stream.cancel()

    def create_webhook(self, url: str, event_types: list[str] | None = None) -> pb.Subscription:
        """Subscribe ``url``; the answer's ``secret`` is shown only this once."""
        request = pb.CreateSubscriptionRequest(url=url, event_types=event_types or [])
        return self.webhooks.CreateSubscription(request, metadata=self.metadata)

    def list_webhooks(self) -> list[pb.Subscription]:
        response = self.webhooks.ListSubscriptions(pb.ListSubscriptionsRequest(page_size=500), metadata=self.metadata)
        return list(response.subscriptions)

    def delete_webhook(self, subscription_id: str) -> None:
        self.webhooks.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id=subscription_id),
                                         metadata=self.metadata)

    def list_deliveries(self, subscription_id: str, state: str = "") -> list[pb.Delivery]:
        """A subscription's deliveries, newest first (``state``: PENDING, DELIVERED or FAILED)."""
        request = pb.ListDeliveriesRequest(subscription_id=subscription_id, state=state, page_size=500)
        return list(self.webhooks.ListDeliveries(request, metadata=self.metadata).deliveries)

    def get_snapshot(self, snapshot_id: str) -> pb.Snapshot:
        return self.snapshots.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snapshot_id), metadata=self.metadata)

    def approve(self, run_id: str, description: str = "", user: str = "", *, approved: bool = True) -> pb.Approval:
        decision = pb.DECISION_APPROVED if approved else pb.DECISION_REJECTED
        request = pb.CreateApprovalRequest(run_id=run_id, decision=decision, description=description, user=user)
        return self.approvals.CreateApproval(request, metadata=self.metadata)

    def list_api_keys(self, account_id: str) -> list[pb.ApiKey]:
        return all_pages(
            lambda token: self.accounts.ListApiKeys(
                pb.ListApiKeysRequest(account_id=account_id, page_token=token), metadata=self.admin_metadata
            ),
            "api_keys",
        )

    def revoke_api_key(self, account_id: str, key_id: str) -> pb.ApiKey:
        request = pb.RevokeApiKeyRequest(account_id=account_id, key_id=key_id)
        return self.accounts.RevokeApiKey(request, metadata=self.admin_metadata)

    def list_audit(self, page_size: int = 50) -> list[pb.AuditEntry]:
        """The newest ``page_size`` audit entries of the account."""
        request = pb.ListAuditEntriesRequest(page_size=page_size)
        return list(self.audit.ListAuditEntries(request, metadata=self.metadata).entries)

    def export_audit(self, after_id: int = 0, limit: int = 1000) -> pb.ExportAuditEventsResponse:
        request = pb.ExportAuditEventsRequest(after_id=after_id, limit=limit)
        return self.audit.ExportAuditEvents(request, metadata=self.metadata)

    def predict(self, model_id: str, *, example_id: str | None = None, image: bytes | None = None) -> pb.PredictResponse:
        request = pb.PredictRequest(model_id=model_id)
        if example_id is not None:
            request.example_id = example_id
        if image is not None:
            request.image = image
        return self.predictions.Predict(request, metadata=self.metadata)

    def download_artifact(self, model_id: str, target: Path, run_id: str = "") -> pb.ArtifactInfo:
        """Write the artifact to ``target``; returns what the server announced (sha256, size, the
        run it came from) after checking the bytes against the sha256.

        The bytes go to a temporary file next to ``target`` that is renamed into place only once
        the sha256 matched, so a failed download (an RPC error, a mismatch, Ctrl-C) leaves no
        partial file behind and never replaces a file already at ``target``.
        """
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        info = None
        digest = hashlib.sha256()
        handle = open(partial, "xb")  # "x": never someone else's file, so ours alone is removed
        try:
            with handle:
                for chunk in self.artifacts.DownloadArtifact(
                    pb.DownloadArtifactRequest(model_id=model_id, run_id=run_id), metadata=self.metadata
                ):
                    if chunk.HasField("info"):
                        info = chunk.info
                    else:
                        handle.write(chunk.data)
                        digest.update(chunk.data)
            if info is None or digest.hexdigest() != info.sha256:
                raise ArtifactMismatch("downloaded artifact does not match the sha256 the server announced; nothing was written")
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return info
