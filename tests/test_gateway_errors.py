"""Errors a client meets through the gateway: bad configs, unknown images, auth, other accounts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pml import audit
from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.v1 import pml_pb2 as pb
from tests.conftest import Stack


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fhir")
    write_demo_fhir(folder)
    return folder


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT must carry google.rpc.Status details"
    out = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def test_bad_config_is_rejected_with_field_and_reason_and_nothing_saved(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    config = digits_config("imgClf")
    config["trainingApproach"]["searchSpace"][0].update({"min": 0.5, "max": 0.1})
    config["trainingApproach"]["objective"]["metric"] = "validation:nope"
    config["trainingApproach"]["metricDefinitions"][0]["regex"] = "accuracy=[0-9.]+"
    with pytest.raises(grpc.RpcError) as caught:
        client.create_model(config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert "min (0.5) is greater than max (0.1)" in violations["trainingApproach.searchSpace[0].min"]
    assert "not among metricDefinitions" in violations["trainingApproach.objective.metric"]
    assert "capture group" in violations["trainingApproach.metricDefinitions[0].regex"]
    listed = client.models.ListModels(pb.ListModelsRequest(), metadata=client.metadata)
    assert list(listed.models) == [], "a rejected config must not be saved"


def test_config_json_that_does_not_parse_names_the_field(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    with pytest.raises(grpc.RpcError) as caught:
        client.models.CreateModel(pb.CreateModelRequest(config_json="{nope"), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config_json" in field_violations(caught.value)
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(grpc.RpcError) as caught:
        client.models.CreateModel(pb.CreateModelRequest(config_json=deep), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"config_json": "JSON nested too deeply"}


def test_an_empty_id_is_invalid_not_a_lookup(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    for field, call in (
        ("model_id", lambda: client.models.GetModel(pb.GetModelRequest(model_id=""), metadata=client.metadata)),
        ("run_id", lambda: client.get_run("")),
        ("run_id", lambda: list(client.events.WatchRun(pb.WatchRunRequest(run_id=""), metadata=client.metadata))),
        ("trial_id", lambda: client.runs.GetTrial(pb.GetTrialRequest(trial_id=""), metadata=client.metadata)),
        ("model_id", lambda: client.create_run("")),
        ("example_id", lambda: client.predict("any-model", example_id="")),
        ("after_event_id", lambda: list(client.events.WatchEvents(pb.WatchEventsRequest(after_event_id=-5),
                                                                  metadata=client.metadata))),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert list(field_violations(caught.value)) == [field]


def test_unresolvable_image_fails_the_run_with_that_reason(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    config = digits_config("imgClf", train_image="registry.example/unknown:1")
    model = client.create_model(config)
    run_id = client.create_run(model.id).id
    states = [json.loads(e.data_json)["status"] for e in client.watch_run(run_id) if e.type == "run.state"]
    assert states == ["PENDING", "CURATING", "TUNING", "FAILED"]
    run = client.get_run(run_id)
    assert run.failed_step == "tune"
    assert "registry.example/unknown:1" in run.failure_reason and "pml images add" in run.failure_reason


def test_calls_without_a_valid_key_are_unauthenticated(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    for account, key in ((client.account, "pml_wrong"), (client.account, ""), ("", client.api_key)):
        other = stack.client(account, key)
        with pytest.raises(grpc.RpcError) as caught:
            other.models.ListModels(pb.ListModelsRequest(), metadata=other.metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        other.close()


def test_admin_calls_need_the_admin_key_and_refusals_are_audited(stack: Stack, small_folder: Path) -> None:
    client = stack.client()
    client.admin_key = "not-the-admin-key"
    with pytest.raises(grpc.RpcError) as caught:
        client.create_account("someone", {"type": "folder", "path": str(small_folder)})
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    keyless = stack.client()
    with pytest.raises(grpc.RpcError) as caught:
        keyless.accounts.ListApiKeys(pb.ListApiKeysRequest(account_id="someone"), metadata=[])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with stack.app.session() as session:
        entries = audit.list_entries(session, "someone")
        got = [(e.actor, e.action, e.target_type, e.target_id, e.outcome, e.interface) for e in entries]
        presented = [str(audit.to_audit_event(e)) for e in entries]
    assert got == [
        ("unknown", "account.create", "account", "someone", "PERMISSION_DENIED", "grpc"),
        ("unknown", "apikey.list", "account", "someone", "UNAUTHENTICATED", "grpc"),
    ]
    assert not any("not-the-admin-key" in text for text in presented), "the presented key is never logged"


def test_an_overlong_account_id_is_invalid_not_an_internal_error(stack: Stack, small_folder: Path) -> None:
    admin = stack.client()
    with pytest.raises(grpc.RpcError) as caught:
        admin.create_account("a" * 100, {"type": "folder", "path": str(small_folder)})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "the audit entry must fit its columns"
    assert "accountId" in field_violations(caught.value)


def test_bad_page_sizes_and_tokens_name_the_field(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    token = lambda text: base64.urlsafe_b64encode(text.encode()).decode()  # noqa: E731
    calls = [
        (pb.ListModelsRequest(page_size=-1), "page_size"),
        (pb.ListModelsRequest(page_token="not-a-token!"), "page_token"),
        (pb.ListModelsRequest(page_token=token("-2")), "page_token"),   # a negative offset
        (pb.ListModelsRequest(page_token=token("x7")), "page_token"),
        (pb.ListModelsRequest(page_token=token("2").rstrip("=")), "page_token"),  # not as issued
    ]
    for request, field in calls:
        with pytest.raises(grpc.RpcError) as caught:
            client.models.ListModels(request, metadata=client.metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert list(field_violations(caught.value)) == [field], request
    for call, request in (
        (client.runs.ListRuns, pb.ListRunsRequest(page_size=-5)),
        (client.audit.ListAuditEntries, pb.ListAuditEntriesRequest(page_token="@@")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=client.metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Zero is the default size, one above the maximum the maximum.
    assert client.models.ListModels(pb.ListModelsRequest(page_size=0), metadata=client.metadata).models == []
    assert client.models.ListModels(pb.ListModelsRequest(page_size=10**6), metadata=client.metadata).models == []


def test_another_accounts_objects_are_not_found(stack: Stack, small_folder: Path) -> None:
    owner = stack.new_account(small_folder)
    stranger = stack.new_account(small_folder)
    model = owner.create_model(digits_config("imgClf", train_image="registry.example/unknown:1"))
    for call in (
        lambda: stranger.models.GetModel(pb.GetModelRequest(model_id=model.id), metadata=stranger.metadata),
        lambda: stranger.create_run(model.id),
        lambda: stranger.predict(model.id, example_id="digit-0001"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_duplicate_account_is_already_exists_and_bad_sources_are_named(stack: Stack, small_folder: Path) -> None:
    admin = stack.client()
    admin.create_account("dup-account", {"type": "folder", "path": str(small_folder)})
    with pytest.raises(grpc.RpcError) as caught:
        admin.create_account("dup-account", {"type": "folder", "path": str(small_folder)})
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for source, field in (
        ({"type": "folder", "path": "relative/path"}, "fhirSource.path"),
        ({"type": "folder", "path": str(small_folder / "missing")}, "fhirSource.path"),
        ({"type": "folder", "path": str(small_folder), "surprise": 1}, "fhirSource.surprise"),
        ({"type": "server", "baseUrl": "ftp://x"}, "fhirSource.baseUrl"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            admin.create_account("bad-source", source)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(caught.value)


def test_non_finite_numbers_in_a_config_are_invalid_not_internal(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    config = digits_config("imgClf")
    config["trainingApproach"]["searchSpace"][0]["min"] = float("nan")
    with pytest.raises(grpc.RpcError) as caught:
        client.create_model(config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trainingApproach.searchSpace[0].min" in field_violations(caught.value)


def test_approving_a_run_that_is_not_completed_is_a_failed_precondition(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    model = client.create_model(digits_config("imgClf", train_image="registry.example/unknown:1"))
    run_id = client.create_run(model.id).id
    for _ in client.watch_run(run_id):
        pass
    with pytest.raises(grpc.RpcError) as caught:
        client.approve(run_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a COMPLETED run can be approved" in caught.value.details()
