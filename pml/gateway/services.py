"""The pml.v1 servicers: authenticate, call one pml function, convert the answer."""

from __future__ import annotations

import json
from typing import Iterator

import grpc
from google.protobuf import empty_pb2

from pml import accounts, audit, commands, models, runs, trials
from pml.app import App
from pml.curation import get_snapshot
from pml.errors import InvalidArgument
from pml.gateway import convert, paging
from pml.gateway.auth import admin_caller, caller
from pml.gateway.errors import grpc_errors, grpc_stream_errors
from pml.tuning.logs import trial_log_lines
from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

ARTIFACT_CHUNK = 256 * 1024


def _json(field: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument([(field, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from None
    except RecursionError:
        raise InvalidArgument([(field, "JSON nested too deeply")]) from None


class AccountService(rpc.AccountServiceServicer):
    """Admin calls: accounts and their API keys."""

    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateAccount(self, request: pb.CreateAccountRequest, context: grpc.ServicerContext) -> pb.Account:
        who = admin_caller(self.app, context, request.account_id, "account.create")
        source = _json("fhir_source_json", request.fhir_source_json or "{}")
        if not isinstance(source, dict):
            raise InvalidArgument([("fhir_source_json", "must be a JSON object")])
        return convert.account(commands.create_account(self.app, who, request.name, source))

    @grpc_errors
    def GetAccount(self, request: pb.GetAccountRequest, context: grpc.ServicerContext) -> pb.Account:
        admin_caller(self.app, context, request.account_id, "account.get")
        with self.app.session() as session:
            return convert.account(accounts.get_account(session, request.account_id))

    @grpc_errors
    def ListAccounts(self, request: pb.ListAccountsRequest, context: grpc.ServicerContext) -> pb.ListAccountsResponse:
        admin_caller(self.app, context, "", "account.list")
        with self.app.session() as session:
            rows, token = paging.page(accounts.list_accounts(session), request.page_size, request.page_token)
            return pb.ListAccountsResponse(accounts=[convert.account(r) for r in rows], next_page_token=token)

    @grpc_errors
    def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: grpc.ServicerContext) -> pb.CreateApiKeyResponse:
        who = admin_caller(self.app, context, request.account_id, "apikey.create")
        key, plaintext = commands.create_api_key(self.app, who, request.name)
        return pb.CreateApiKeyResponse(key_id=key.id, api_key=plaintext)

    @grpc_errors
    def ListApiKeys(self, request: pb.ListApiKeysRequest, context: grpc.ServicerContext) -> pb.ListApiKeysResponse:
        admin_caller(self.app, context, request.account_id, "apikey.list")
        with self.app.session() as session:
            rows, token = paging.page(accounts.list_api_keys(session, request.account_id), request.page_size,
                                request.page_token)
            return pb.ListApiKeysResponse(api_keys=[convert.api_key(r) for r in rows], next_page_token=token)

    @grpc_errors
    def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.ServicerContext) -> pb.ApiKey:
        who = admin_caller(self.app, context, request.account_id, "apikey.revoke")
        return convert.api_key(commands.revoke_api_key(self.app, who, request.key_id))


class ModelService(rpc.ModelServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateModel(self, request: pb.CreateModelRequest, context: grpc.ServicerContext) -> pb.Model:
        who = caller(self.app, context)
        return convert.model(commands.create_model(self.app, who, _json("config_json", request.config_json)))

    @grpc_errors
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        who = caller(self.app, context)
        with self.app.session() as session:
            return convert.model(models.get_model(session, who.account_id, request.model_id))

    @grpc_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.page(models.list_models(session, who.account_id), request.page_size, request.page_token)
            return pb.ListModelsResponse(models=[convert.model(r) for r in rows], next_page_token=token)

    @grpc_errors
    def UpdateModel(self, request: pb.UpdateModelRequest, context: grpc.ServicerContext) -> pb.Model:
        who = caller(self.app, context)
        data = _json("config_json", request.config_json)
        return convert.model(commands.update_model(self.app, who, request.model_id, data))

    @grpc_errors
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        who = caller(self.app, context)
        commands.delete_model(self.app, who, request.model_id)
        return empty_pb2.Empty()


class RunService(rpc.RunServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateRun(self, request: pb.CreateRunRequest, context: grpc.ServicerContext) -> pb.Run:
        who = caller(self.app, context)
        return convert.run(commands.create_run(self.app, who, request.model_id))

    @grpc_errors
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.Run:
        who = caller(self.app, context)
        with self.app.session() as session:
            return convert.run(runs.get_run(session, who.account_id, request.run_id))

    @grpc_errors
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            if request.model_id:
                models.get_model(session, who.account_id, request.model_id)
            rows, token = paging.page(runs.list_runs(session, who.account_id, request.model_id or None), request.page_size,
                                request.page_token)
            return pb.ListRunsResponse(runs=[convert.run(r) for r in rows], next_page_token=token)

    @grpc_errors
    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> pb.Run:
        who = caller(self.app, context)
        return convert.run(commands.cancel_run(self.app, who, request.run_id))

    @grpc_errors
    def ListTrials(self, request: pb.ListTrialsRequest, context: grpc.ServicerContext) -> pb.ListTrialsResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.page(trials.list_trials(session, who.account_id, request.run_id), request.page_size,
                                request.page_token)
            return pb.ListTrialsResponse(trials=[convert.trial(r) for r in rows], next_page_token=token)

    @grpc_errors
    def GetTrial(self, request: pb.GetTrialRequest, context: grpc.ServicerContext) -> pb.Trial:
        who = caller(self.app, context)
        with self.app.session() as session:
            row = trials.get_trial(session, who.account_id, request.trial_id)
            series = trials.trial_metric_series(session, who.account_id, row.id)
            return convert.trial(row, series)

    @grpc_stream_errors
    def StreamTrialLogs(self, request: pb.StreamTrialLogsRequest, context: grpc.ServicerContext) -> Iterator[pb.LogLine]:
        who = caller(self.app, context)
        if request.offset < 0:
            raise InvalidArgument([("offset", "must be 0 or more")])
        for line in trial_log_lines(self.app, who.account_id, request.trial_id, request.offset, request.follow):
            if not context.is_active():
                return
            yield pb.LogLine(text=line.text, next_offset=line.offset)


class SnapshotService(rpc.SnapshotServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.Snapshot:
        who = caller(self.app, context)
        with self.app.session() as session:
            snapshot, examples = get_snapshot(session, who.account_id, request.snapshot_id)
            return pb.Snapshot(
                id=snapshot.id, stats_json=json.dumps(snapshot.stats),
                examples=[pb.SnapshotExample(example_id=e.example_id, split=e.split, labels=e.labels) for e in examples],
            )


DECISIONS = {pb.DECISION_APPROVED: "approved", pb.DECISION_REJECTED: "rejected"}


class ApprovalService(rpc.ApprovalServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateApproval(self, request: pb.CreateApprovalRequest, context: grpc.ServicerContext) -> pb.Approval:
        who = caller(self.app, context)
        if request.decision not in DECISIONS:
            raise InvalidArgument([("decision", "must be DECISION_APPROVED or DECISION_REJECTED")])
        approval = commands.approve_run(
            self.app, who, request.run_id, DECISIONS[request.decision], request.description, request.user
        )
        return convert.approval(approval)

    @grpc_errors
    def ListApprovals(self, request: pb.ListApprovalsRequest, context: grpc.ServicerContext) -> pb.ListApprovalsResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.page(runs.list_approvals(session, who.account_id, request.run_id), request.page_size,
                                request.page_token)
            return pb.ListApprovalsResponse(approvals=[convert.approval(r) for r in rows], next_page_token=token)


class PredictionService(rpc.PredictionServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        who = caller(self.app, context)
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument([("input", "give example_id or image")])
        result = commands.predict(
            self.app, who, request.model_id,
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
        who = caller(self.app, context)
        artifact = commands.open_artifact(self.app, who, request.model_id, request.run_id or None)
        yield pb.ArtifactChunk(info=pb.ArtifactInfo(sha256=artifact.sha256, size=artifact.size, run_id=artifact.run_id))
        with open(artifact.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(ARTIFACT_CHUNK), b""):
                yield pb.ArtifactChunk(data=chunk)


class AuditService(rpc.AuditServiceServicer):
    """An account reads its own audit log; the export is FHIR AuditEvents."""

    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def ListAuditEntries(self, request: pb.ListAuditEntriesRequest, context: grpc.ServicerContext) -> pb.ListAuditEntriesResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.newest_first_page(audit.list_entries(session, who.account_id, newest_first=True),
                                             lambda entry: entry.id, request.page_size, request.page_token)
            return pb.ListAuditEntriesResponse(entries=[convert.audit_entry(r) for r in rows], next_page_token=token)

    @grpc_errors
    def ExportAuditEvents(self, request: pb.ExportAuditEventsRequest, context: grpc.ServicerContext) -> pb.ExportAuditEventsResponse:
        who = caller(self.app, context)
        limit = request.limit or 1000
        if not 1 <= limit <= 10000:
            raise InvalidArgument([("limit", "must be from 1 to 10000")])
        with self.app.session() as session:
            rows = audit.list_entries(session, who.account_id, after_id=request.after_id, limit=limit)
        bundle = audit.export_bundle(rows)
        return pb.ExportAuditEventsResponse(bundle_json=json.dumps(bundle), last_id=rows[-1].id if rows else request.after_id)
