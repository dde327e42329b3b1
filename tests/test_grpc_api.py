"""The gRPC API beyond the main flow: admin calls, model updates and deletes, paging,
other accounts, the audit log and its FHIR export, health and reflection."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from fhir.resources.bundle import Bundle
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pml import runs
from pml.demo import digits_config
from pml.v1 import pml_pb2 as pb
from tests.conftest import Stack


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Nothing here curates: an empty folder is a valid source.
    return tmp_path_factory.mktemp("empty-fhir")


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code()


def labels_of(model: pb.Model) -> dict[str, tuple[str, int]]:
    config = json.loads(model.config_json)
    return {l["name"]: (l["id"], l["index"]) for l in config["problemDefinition"]["labelDefinition"]["labels"]}


def test_a_revoked_key_is_refused_and_keys_are_listed_without_secrets(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    admin = stack.client()
    keys = admin.accounts.ListApiKeys(pb.ListApiKeysRequest(account_id=client.account), metadata=admin.admin_metadata)
    assert len(keys.api_keys) == 1 and not keys.api_keys[0].HasField("revoke_time")
    assert client.api_key not in str(keys), "a key's plaintext is shown once, at creation"
    client.models.ListModels(pb.ListModelsRequest(), metadata=client.metadata)  # works before

    revoked = admin.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(account_id=client.account, key_id=keys.api_keys[0].id), metadata=admin.admin_metadata
    )
    assert revoked.HasField("revoke_time")
    assert code_of(client.models.ListModels, pb.ListModelsRequest(), metadata=client.metadata) == grpc.StatusCode.UNAUTHENTICATED
    again = pb.RevokeApiKeyRequest(account_id=client.account, key_id=revoked.id)
    assert code_of(admin.accounts.RevokeApiKey, again, metadata=admin.admin_metadata) == grpc.StatusCode.FAILED_PRECONDITION
    # An account's own key is not the admin key.
    other = stack.new_account(folder)
    assert code_of(other.accounts.RevokeApiKey, again, metadata=[("authorization", f"Bearer {other.api_key}")]) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Another account's key id is unknown in this account.
    foreign = pb.RevokeApiKeyRequest(account_id=other.account, key_id=revoked.id)
    assert code_of(admin.accounts.RevokeApiKey, foreign, metadata=admin.admin_metadata) == grpc.StatusCode.NOT_FOUND


def test_admin_reads_accounts_with_paging(stack: Stack, folder: Path) -> None:
    created = {stack.new_account(folder).account for _ in range(3)}
    admin = stack.client()
    seen: list[str] = []
    token = ""
    while True:
        page = admin.accounts.ListAccounts(pb.ListAccountsRequest(page_size=2, page_token=token), metadata=admin.admin_metadata)
        assert len(page.accounts) <= 2
        seen += [a.id for a in page.accounts]
        token = page.next_page_token
        if not token:
            break
    assert created <= set(seen) and len(seen) == len(set(seen))
    one = admin.accounts.GetAccount(pb.GetAccountRequest(account_id=seen[0]), metadata=admin.admin_metadata)
    assert one.id == seen[0]
    assert code_of(admin.accounts.GetAccount, pb.GetAccountRequest(account_id="nope-nope"), metadata=admin.admin_metadata) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_models_page_without_gaps_or_repeats(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    made = [client.create_model({**digits_config("imgClf"), "name": f"m{i}"}).id for i in range(5)]
    seen, token, pages = [], "", 0
    while True:
        page = client.models.ListModels(pb.ListModelsRequest(page_size=2, page_token=token), metadata=client.metadata)
        seen += [m.id for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == made and pages == 3
    bad = pb.ListModelsRequest(page_token="not-a-token!")
    assert code_of(client.models.ListModels, bad, metadata=client.metadata) == grpc.StatusCode.INVALID_ARGUMENT


def walk(list_call, request_type, field: str, metadata, page_size: int) -> tuple[list[str], int]:  # type: ignore[no-untyped-def]
    """Every id a List call gives, page by page, and how many pages it took."""
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = list_call(request_type(page_size=page_size, page_token=token), metadata=metadata)
        assert len(getattr(page, field)) <= page_size, "a page never holds more than page_size items"
        seen += [str(item.id) for item in getattr(page, field)]
        pages += 1
        token = page.next_page_token
        if not token:
            return seen, pages


def test_runs_and_audit_entries_page_without_gaps_or_repeats(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    model = client.create_model(digits_config("imgClf"))
    with stack.app.session() as session:  # runs no worker touches: the list stays as it is
        made = [runs.create_run(session, client.account, model.id).id for _ in range(5)]
    seen, pages = walk(client.runs.ListRuns, pb.ListRunsRequest, "runs", client.metadata, 2)
    assert (seen, pages) == (made, 3), "runs page oldest first, each once"

    for _ in range(4):  # refused commands are audited too: more entries, no side effects
        code_of(client.models.DeleteModel, pb.DeleteModelRequest(model_id="0" * 32), metadata=client.metadata)
    everything = client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=500), metadata=client.metadata)
    expected = [str(e.id) for e in everything.entries]
    assert len(expected) == 7 and not everything.next_page_token
    seen, pages = walk(client.audit.ListAuditEntries, pb.ListAuditEntriesRequest, "entries", client.metadata, 3)
    assert (seen, pages) == (expected, 3), "audit entries page newest first, each once"

    # Entries written between two pages (newest first) must not push old ones onto the next page.
    first = client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=3), metadata=client.metadata)
    for _ in range(2):
        code_of(client.models.DeleteModel, pb.DeleteModelRequest(model_id="0" * 32), metadata=client.metadata)
    rest = client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=500, page_token=first.next_page_token),
                                         metadata=client.metadata)
    assert [str(e.id) for e in first.entries] + [str(e.id) for e in rest.entries] == expected, \
        "a page after new entries repeats or skips none"


def test_cancelling_a_finished_run_is_a_failed_precondition(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    model = client.create_model(digits_config("imgClf"))
    with stack.app.session() as session:
        run = runs.create_run(session, client.account, model.id)
        run.status = "COMPLETED"
    cancel = pb.CancelRunRequest(run_id=run.id)
    with pytest.raises(grpc.RpcError) as caught:
        client.runs.CancelRun(cancel, metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"run {run.id} is COMPLETED" in caught.value.details()
    assert client.get_run(run.id).state == pb.RUN_STATE_COMPLETED, "a refused cancel changes nothing"
    newest = client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=1), metadata=client.metadata).entries[0]
    assert (newest.action, newest.target_id, newest.outcome) == ("run.cancel", run.id, "FAILED_PRECONDITION")


def test_update_keeps_label_ids_and_indexes_and_never_reuses_one(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    config = digits_config("imgClf")
    model = client.create_model(config)
    before = labels_of(model)
    labels = config["problemDefinition"]["labelDefinition"]["labels"]
    dropped = labels[-1]["name"]
    config["problemDefinition"]["labelDefinition"]["labels"] = labels[:-1] + [{"name": "eleven"}]
    config["name"] = "renamed"
    updated = client.models.UpdateModel(
        pb.UpdateModelRequest(model_id=model.id, config_json=json.dumps(config)), metadata=client.metadata
    )
    after = labels_of(updated)
    assert updated.name == "renamed"
    for name in before:
        if name != dropped:
            assert after[name] == before[name], f"{name} must keep its id and index"
    highest = max(index for _, index in before.values())
    assert after["eleven"][1] == highest + 1
    # Adding the dropped label back gives it a new index, never its old one.
    config["problemDefinition"]["labelDefinition"]["labels"].append({"name": dropped})
    again = labels_of(client.models.UpdateModel(
        pb.UpdateModelRequest(model_id=model.id, config_json=json.dumps(config)), metadata=client.metadata
    ))
    assert again[dropped][1] == highest + 2
    assert json.loads(client.models.GetModel(pb.GetModelRequest(model_id=model.id), metadata=client.metadata).config_json)[
        "maxLabelIndex"
    ] == highest + 2
    # A bad update changes nothing.
    config["trainingApproach"]["maxTrials"] = 0
    bad = pb.UpdateModelRequest(model_id=model.id, config_json=json.dumps(config))
    assert code_of(client.models.UpdateModel, bad, metadata=client.metadata) == grpc.StatusCode.INVALID_ARGUMENT
    assert labels_of(client.models.GetModel(pb.GetModelRequest(model_id=model.id), metadata=client.metadata)) == again


def test_an_update_never_changes_a_runs_copy_of_the_config(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    config = digits_config("imgClf")
    model = client.create_model(config)
    run = client.create_run(model.id)
    config["trainingApproach"]["maxTrials"] = 7
    client.models.UpdateModel(pb.UpdateModelRequest(model_id=model.id, config_json=json.dumps(config)), metadata=client.metadata)
    with stack.app.session() as session:
        assert runs.get_run(session, client.account, run.id).config["trainingApproach"]["maxTrials"] != 7


def test_delete_hides_the_model_and_is_refused_while_a_run_is_active(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    model = client.create_model(digits_config("imgClf"))
    with stack.app.session() as session:  # an active run no worker touches
        run = runs.create_run(session, client.account, model.id)
        run.status = "TUNING"
    delete = pb.DeleteModelRequest(model_id=model.id)
    assert code_of(client.models.DeleteModel, delete, metadata=client.metadata) == grpc.StatusCode.FAILED_PRECONDITION
    client.runs.CancelRun(pb.CancelRunRequest(run_id=run.id), metadata=client.metadata)
    client.models.DeleteModel(delete, metadata=client.metadata)
    assert code_of(client.models.GetModel, pb.GetModelRequest(model_id=model.id), metadata=client.metadata) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.create_run, model.id) == grpc.StatusCode.NOT_FOUND
    assert model.id not in [m.id for m in client.models.ListModels(pb.ListModelsRequest(), metadata=client.metadata).models]
    # The run's history stays readable.
    assert client.get_run(run.id).state == pb.RUN_STATE_CANCELLED


def test_another_accounts_objects_answer_not_found_on_every_call(stack: Stack, folder: Path) -> None:
    owner = stack.new_account(folder)
    stranger = stack.new_account(folder)
    model = owner.create_model(digits_config("imgClf"))
    run = owner.create_run(model.id)
    md = stranger.metadata
    calls = [
        (stranger.models.GetModel, pb.GetModelRequest(model_id=model.id)),
        (stranger.models.UpdateModel, pb.UpdateModelRequest(model_id=model.id, config_json=json.dumps(digits_config("imgClf")))),
        (stranger.models.DeleteModel, pb.DeleteModelRequest(model_id=model.id)),
        (stranger.runs.CreateRun, pb.CreateRunRequest(model_id=model.id)),
        (stranger.runs.GetRun, pb.GetRunRequest(run_id=run.id)),
        (stranger.runs.ListRuns, pb.ListRunsRequest(model_id=model.id)),
        (stranger.runs.CancelRun, pb.CancelRunRequest(run_id=run.id)),
        (stranger.runs.ListTrials, pb.ListTrialsRequest(run_id=run.id)),
        (stranger.approvals.ListApprovals, pb.ListApprovalsRequest(run_id=run.id)),
        (stranger.approvals.CreateApproval, pb.CreateApprovalRequest(run_id=run.id, decision=pb.DECISION_APPROVED)),
        (stranger.predictions.Predict, pb.PredictRequest(model_id=model.id, example_id="x")),
    ]
    for call, request in calls:
        assert code_of(call, request, metadata=md) == grpc.StatusCode.NOT_FOUND, call
    stream = stranger.artifacts.DownloadArtifact(pb.DownloadArtifactRequest(model_id=model.id), metadata=md)
    assert code_of(list, stream) == grpc.StatusCode.NOT_FOUND
    # The owner's model is untouched and nothing of it shows in the stranger's audit log.
    assert owner.models.GetModel(pb.GetModelRequest(model_id=model.id), metadata=owner.metadata).id == model.id
    entries = stranger.audit.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=100), metadata=md).entries
    assert entries and all(e.account_id == stranger.account for e in entries)
    assert {e.outcome for e in entries if e.action != "account.create" and e.action != "apikey.create"} == {"NOT_FOUND"}


def test_commands_are_audited_with_outcomes_and_export_as_fhir(stack: Stack, folder: Path) -> None:
    client = stack.new_account(folder)
    model = client.create_model(digits_config("imgClf"))
    bad = digits_config("imgClf")
    bad["trainingApproach"]["maxTrials"] = 0
    assert code_of(client.create_model, bad) == grpc.StatusCode.INVALID_ARGUMENT
    run = client.create_run(model.id)
    missing = pb.DeleteModelRequest(model_id="0" * 32)
    assert code_of(client.models.DeleteModel, missing, metadata=client.metadata) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.approve, run.id) == grpc.StatusCode.FAILED_PRECONDITION

    entries = list(client.audit.ListAuditEntries(pb.ListAuditEntriesRequest(), metadata=client.metadata).entries)
    got = [(e.action, e.target_id, e.outcome) for e in reversed(entries)]  # newest first → oldest first
    assert got == [
        ("account.create", client.account, "ok"),
        ("apikey.create", got[1][1], "ok"),
        ("model.create", model.id, "ok"),
        ("model.create", "", "INVALID_ARGUMENT"),
        ("run.create", run.id, "ok"),
        ("model.delete", "0" * 32, "NOT_FOUND"),
        ("run.approve", run.id, "FAILED_PRECONDITION"),
    ]
    key_actor = [e.actor for e in entries if e.action == "model.create"]
    assert all(a.startswith("key:") for a in key_actor) and entries[-1].actor == "admin"
    assert {e.interface for e in entries} == {"grpc"}

    exported = client.audit.ExportAuditEvents(pb.ExportAuditEventsRequest(), metadata=client.metadata)
    bundle = Bundle.model_validate_json(exported.bundle_json)  # validates every AuditEvent in it
    events = [e.resource for e in bundle.entry]
    assert [e.code.text for e in events] == [g[0] for g in got]
    assert events[3].outcome.code.code == "error" and events[2].outcome.code.code == "information"
    assert events[2].action == "C" and events[5].action == "D" and events[6].action == "U"
    assert exported.last_id == max(e.id for e in entries)
    more = client.audit.ExportAuditEvents(pb.ExportAuditEventsRequest(after_id=exported.last_id), metadata=client.metadata)
    assert json.loads(more.bundle_json).get("entry", []) == []


def test_health_and_reflection_list_the_services(stack: Stack) -> None:
    channel = grpc.insecure_channel(stack.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pml.v1.ModelService", "pml.v1.EventService", "pml.v1.AuditService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"pml.v1.RunService", "pml.v1.EventService", "pml.v1.AuditService", "grpc.health.v1.Health"} <= names
    channel.close()
