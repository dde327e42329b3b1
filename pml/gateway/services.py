"""The pml.v1 servicers: authenticate, call one pml function, convert the answer."""

from __future__ import annotations

import base64
import json
import time
from typing import Iterator, TypeVar

import grpc

from pml import accounts, models, runs
from pml.app import App
from pml.errors import InvalidArgument
from pml.curation import get_snapshot
from pml.events import list_events
from pml.gateway import convert
from pml.gateway.auth import caller_account, require_admin
from pml.gateway.errors import grpc_errors, grpc_stream_errors
from pml.serving.predict import artifact_for, predict
from pml.store.tables import Trial
from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

DEFAULT_PAGE = 50
MAX_PAGE = 500
WATCH_POLL_S = 0.1
ARTIFACT_CHUNK = 256 * 1024

T = TypeVar("T")


def _page(items: list[T], page_size: int, page_token: str) -> tuple[list[T], str]:
    """Offset paging; the token is opaque to clients."""
    size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
    try:
        start = int(base64.urlsafe_b64decode(page_token.encode()).decode()) if page_token else 0
    except ValueError:
        raise InvalidArgument([("page_token", "not a token this service issued")]) from None
    chunk = items[start : start + size]
    end = start + len(chunk)
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return chunk, token


def _json(field: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument([(field, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from None


class AccountService(rpc.AccountServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateAccount(self, request: pb.CreateAccountRequest, context: grpc.ServicerContext) -> pb.Account:
        require_admin(self.app, context)
        source = _json("fhir_source_json", request.fhir_source_json or "{}")
        if not isinstance(source, dict):
            raise InvalidArgument([("fhir_source_json", "must be a JSON object")])
        with self.app.session() as session:
            return convert.account(accounts.create_account(session, request.account_id, request.name, source))

    @grpc_errors
    def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: grpc.ServicerContext) -> pb.CreateApiKeyResponse:
        require_admin(self.app, context)
        with self.app.session() as session:
            key, plaintext = accounts.create_api_key(session, request.account_id, request.name)
            return pb.CreateApiKeyResponse(key_id=key.id, api_key=plaintext)


class ModelService(rpc.ModelServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateModel(self, request: pb.CreateModelRequest, context: grpc.ServicerContext) -> pb.Model:
        account = caller_account(self.app, context)
        data = _json("config_json", request.config_json)
        with self.app.session() as session:
            return convert.model(models.create_model(session, account, data))

    @grpc_errors
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            return convert.model(models.get_model(session, account, request.model_id))

    @grpc_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            rows, token = _page(models.list_models(session, account), request.page_size, request.page_token)
            return pb.ListModelsResponse(models=[convert.model(r) for r in rows], next_page_token=token)


class RunService(rpc.RunServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateRun(self, request: pb.CreateRunRequest, context: grpc.ServicerContext) -> pb.Run:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            run = runs.create_run(session, account, request.model_id)
            message = convert.run(run)
        self.app.enqueue("curate", account, run.id)  # after commit: the worker must see the row
        return message

    @grpc_errors
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.Run:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            return convert.run(runs.get_run(session, account, request.run_id))

    @grpc_errors
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            if request.model_id:
                models.get_model(session, account, request.model_id)
            rows, token = _page(runs.list_runs(session, account, request.model_id or None), request.page_size,
                                request.page_token)
            return pb.ListRunsResponse(runs=[convert.run(r) for r in rows], next_page_token=token)

    @grpc_errors
    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> pb.Run:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            return convert.run(runs.cancel_run(session, account, request.run_id))

    @grpc_errors
    def ListTrials(self, request: pb.ListTrialsRequest, context: grpc.ServicerContext) -> pb.ListTrialsResponse:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            runs.get_run(session, account, request.run_id)
            rows = session.query(Trial).filter(Trial.account_id == account, Trial.run_id == request.run_id)
            return pb.ListTrialsResponse(trials=[convert.trial(r) for r in rows.order_by(Trial.number)])

    @grpc_stream_errors
    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            runs.get_run(session, account, request.run_id)
        after = request.after_event_id
        while context.is_active():
            with self.app.session() as session:
                batch = list_events(session, account, after_id=after, run_id=request.run_id)
            for row in batch:
                after = row.id
                yield convert.event(row)
            if not batch:
                time.sleep(WATCH_POLL_S)


class SnapshotService(rpc.SnapshotServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.Snapshot:
        account = caller_account(self.app, context)
        with self.app.session() as session:
            snapshot, examples = get_snapshot(session, account, request.snapshot_id)
            return pb.Snapshot(
                id=snapshot.id, stats_json=json.dumps(snapshot.stats),
                examples=[pb.SnapshotExample(example_id=e.example_id, split=e.split, labels=e.labels) for e in examples],
            )


class ApprovalService(rpc.ApprovalServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateApproval(self, request: pb.CreateApprovalRequest, context: grpc.ServicerContext) -> pb.Approval:
        account = caller_account(self.app, context)
        decisions = {pb.DECISION_APPROVED: "approved", pb.DECISION_REJECTED: "rejected"}
        if request.decision not in decisions:
            raise InvalidArgument([("decision", "must be DECISION_APPROVED or DECISION_REJECTED")])
        with self.app.session() as session:
            approval, deploy = runs.approve_run(
                session, account, request.run_id, decisions[request.decision], request.description, request.user
            )
            message = convert.approval(approval)
        if deploy:
            self.app.enqueue("deploy", account, request.run_id)
        return message


class PredictionService(rpc.PredictionServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        account = caller_account(self.app, context)
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument([("input", "give example_id or image")])
        result = predict(
            self.app, account, request.model_id,
            example_id=request.example_id if which == "example_id" else None,
            image=request.image if which == "image" else None,
        )
        return pb.PredictResponse(
            problem_type=result.problem_type,
            predictions=[pb.LabelPrediction(index=s.index, value=s.value, confidence=s.confidence) for s in result.labels],
            mask_png=result.mask_png or b"",
        )


class ArtifactService(rpc.ArtifactServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_stream_errors
    def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        account = caller_account(self.app, context)
        sha, size = artifact_for(self.app, account, request.model_id, request.run_id or None)
        yield pb.ArtifactChunk(info=pb.ArtifactInfo(sha256=sha, size=size, run_id=request.run_id))
        with open(self.app.blobs(account).path(sha), "rb") as handle:
            for chunk in iter(lambda: handle.read(ARTIFACT_CHUNK), b""):
                yield pb.ArtifactChunk(data=chunk)
