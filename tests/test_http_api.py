"""The HTTP/JSON API (/v1/patient-ml) over real loopback HTTP, on the real stack.

One completed, approved and deployed run is shared by the tests that need one (module
fixture); the rest use cheap accounts and runs that fail at curation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from pml.demo import digits_config
from pml.demo_data import DIGIT_NAMES, classification_example_id, png_bytes, write_demo_fhir
from pml.http.app import openapi_document
from pml.v1 import pml_pb2 as pb
from tests.conftest import ROOT, Stack, wait_for

RUN_TIMEOUT_S = 300
DOCS_OPENAPI = ROOT / "docs" / "openapi.json"


@dataclass
class Account:
    id: str
    key: str
    http: httpx.Client


def http_client(base: str, account: str, key: str, account_header: str = "LifeOmic-Account") -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}", account_header: account}
    return httpx.Client(base_url=f"{base}/v1/patient-ml", headers=headers, timeout=60)


def new_account(stack: Stack, base: str, folder: Path) -> Account:
    client = stack.new_account(folder)
    client.close()
    return Account(client.account, client.api_key, http_client(base, client.account, client.api_key))


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, f"wanted {status}, got {response.status_code} {response.text}"
    body = response.json()
    assert body["code"] == code, body
    return body


def labelled_config(labels: list[str], name: str = "labels") -> dict[str, Any]:
    """A config whose filter matches no record: its runs fail at curation within seconds."""
    config = digits_config("imgClf")
    config["name"] = name
    config["problemDefinition"]["trainingDataFilter"]["codes"] = ["urn:pml:test|matches-nothing"]
    config["problemDefinition"]["labelDefinition"]["labels"] = [{"name": n} for n in labels]
    return config


def wait_run(account: Account, model_id: str, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        run = ok(account.http.get(f"/models/{model_id}/runs/{run_id}"))
        return run if run["status"] != "running" else None

    return wait_for(ended, timeout_s, f"run {run_id} to end", interval=1.0)


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-records")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("digits-http")
    return folder, {classification_example_id(d): d for d in write_demo_fhir(folder)}


@pytest.fixture(scope="module")
def completed(stack: Stack, http_base: str, digits: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """A digits model created, run, approved with the older ``choice`` and deployed, all over HTTP."""
    folder, by_id = digits
    account = new_account(stack, http_base, folder)
    model = ok(account.http.post("/models", json=digits_config("imgClf", max_trials=2)))["model"]
    run_id = ok(account.http.post(f"/models/{model['id']}/runs"))["runId"]
    run = wait_run(account, model["id"], run_id)
    assert run["status"] == "succeeded", f"{run.get('error')}\n{stack.worker_log_tail()}"
    approval = ok(account.http.post(
        f"/models/{model['id']}/runs/{run_id}/approvals",
        json={"choice": "approved", "description": "good enough", "user": "dr-test"},
    ))

    def deployed() -> dict[str, Any] | None:
        body = ok(account.http.get(f"/models/{model['id']}/runs/{run_id}"))
        assert body["deployStatus"] != "failed", body.get("deployError")
        return body if body["deployStatus"] == "deployed" else None

    run = wait_for(deployed, 120, "the deployment")
    return {"account": account, "model": model, "run": run, "approval": approval, "digits": by_id}


@pytest.fixture(scope="module")
def failed(stack: Stack, http_base: str, empty_folder: Path) -> dict[str, Any]:
    """A run that failed at curation (no records), and the model it belongs to."""
    account = new_account(stack, http_base, empty_folder)
    model = ok(account.http.post("/models", json=labelled_config(["a", "b"])))["model"]
    run_id = ok(account.http.post(f"/models/{model['id']}/runs"))["runId"]
    return {"account": account, "model": model, "run": wait_run(account, model["id"], run_id, 120)}


# ---- the document --------------------------------------------------------------------------


def test_openapi_document_is_published_and_committed(http_base: str) -> None:
    served = ok(httpx.get(f"{http_base}/v1/patient-ml/openapi.json"))
    paths = set(served["paths"])
    for path in ("/models", "/models/{modelId}", "/models/{modelId}/runs", "/models/{modelId}/runs/{runId}",
                 "/models/{modelId}/runs/{runId}/approvals", "/models/{modelId}/runs/{runId}/model-artifact",
                 "/models/{modelId}/predict"):
        assert f"/v1/patient-ml{path}" in paths, path
    assert served == openapi_document()
    assert DOCS_OPENAPI.exists() and json.loads(DOCS_OPENAPI.read_text()) == served, (
        "docs/openapi.json is stale: regenerate it with `python -m pml.http.app > docs/openapi.json`"
    )


# ---- auth ----------------------------------------------------------------------------------


def test_missing_wrong_or_revoked_keys_are_401(stack: Stack, http_base: str, empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    other = new_account(stack, http_base, empty_folder)
    admin = stack.client()
    issued = admin.accounts.CreateApiKey(pb.CreateApiKeyRequest(account_id=account.id, name="short-lived"),
                                         metadata=admin.admin_metadata)
    revocable = http_client(http_base, account.id, issued.api_key)
    assert ok(revocable.get("/models")) == {"items": []}
    admin.accounts.RevokeApiKey(pb.RevokeApiKeyRequest(account_id=account.id, key_id=issued.key_id),
                                metadata=admin.admin_metadata)
    admin.close()
    base = f"{http_base}/v1/patient-ml"
    attempts = {
        "no headers": httpx.get(f"{base}/models"),
        "no key": httpx.get(f"{base}/models", headers={"LifeOmic-Account": account.id}),
        "no account": httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {account.key}"}),
        "not bearer": httpx.get(f"{base}/models", headers={"Authorization": f"Basic {account.key}",
                                                           "LifeOmic-Account": account.id}),
        "wrong key": http_client(http_base, account.id, "pml_wrong").get("/models"),
        "another account's key": http_client(http_base, account.id, other.key).get("/models"),
        "revoked key": revocable.get("/models"),
        "revoked key, mutation": revocable.post("/models", json=labelled_config(["a", "b"])),
    }
    for what, response in attempts.items():
        body = error(response, 401, "UNAUTHENTICATED")
        assert response.headers.get("www-authenticate") == "Bearer", what
        assert body["message"], what
    # The pml-account header works as well as LifeOmic-Account.
    assert ok(http_client(http_base, account.id, account.key, "pml-account").get("/models")) == {"items": []}


def test_another_accounts_objects_are_404_like_missing_ids(completed: dict[str, Any], stack: Stack,
                                                            http_base: str, empty_folder: Path) -> None:
    intruder = new_account(stack, http_base, empty_folder).http
    model_id, run_id = completed["model"]["id"], completed["run"]["id"]
    missing = uuid.uuid4().hex
    calls = {
        "get model": lambda m, r: intruder.get(f"/models/{m}"),
        "update model": lambda m, r: intruder.put(f"/models/{m}", json=labelled_config(["x", "y"])),
        "delete model": lambda m, r: intruder.delete(f"/models/{m}"),
        "create run": lambda m, r: intruder.post(f"/models/{m}/runs"),
        "list runs": lambda m, r: intruder.get(f"/models/{m}/runs"),
        "get run": lambda m, r: intruder.get(f"/models/{m}/runs/{r}"),
        "approve": lambda m, r: intruder.post(f"/models/{m}/runs/{r}/approvals", json={"decision": "rejected"}),
        "artifact": lambda m, r: intruder.get(f"/models/{m}/runs/{r}/model-artifact"),
        "predict": lambda m, r: intruder.post(f"/models/{m}/predict", json={"exampleId": "x"}),
    }
    for what, call in calls.items():
        theirs = error(call(model_id, run_id), 404, "NOT_FOUND")
        absent = error(call(missing, missing), 404, "NOT_FOUND")
        assert theirs["message"].replace(model_id, missing) == absent["message"], what
    # Nothing happened to the owner's objects.
    owner = completed["account"].http
    assert ok(owner.get(f"/models/{model_id}"))["name"] == completed["model"]["name"]
    assert len(ok(owner.get(f"/models/{model_id}/runs/{run_id}"))["approvals"]) == 1


# ---- models --------------------------------------------------------------------------------


def test_model_create_get_list_update_delete(stack: Stack, http_base: str, empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    created = ok(account.http.post("/models", json=labelled_config(["cat", "dog"], name="pets")))
    assert set(created) == {"model"}, "creating a model answers {'model': {...}}"
    model = created["model"]
    assert model["accountId"] == account.id and model["name"] == "pets"
    labels = model["problemDefinition"]["labelDefinition"]["labels"]
    assert [(label["name"], label["index"]) for label in labels] == [("cat", 0), ("dog", 1)]
    assert all(label["id"] for label in labels) and model["maxLabelIndex"] == 1
    assert ok(account.http.get(f"/models/{model['id']}")) == model
    assert [m["id"] for m in ok(account.http.get("/models"))["items"]] == [model["id"]]

    # A fetched model can be sent back as it is (server-set fields are ignored).
    fetched = ok(account.http.get(f"/models/{model['id']}"))
    fetched["description"] = "edited"
    updated = ok(account.http.put(f"/models/{model['id']}", json=fetched))
    assert updated["description"] == "edited" and updated["id"] == model["id"]

    assert account.http.delete(f"/models/{model['id']}").status_code == 204
    error(account.http.get(f"/models/{model['id']}"), 404, "NOT_FOUND")
    error(account.http.delete(f"/models/{model['id']}"), 404, "NOT_FOUND")
    assert ok(account.http.get("/models")) == {"items": []}


def test_bad_configs_are_400_with_field_violations_and_nothing_saved(stack: Stack, http_base: str,
                                                                    empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    config = labelled_config(["a", "b"])
    config["trainingApproach"]["searchSpace"][0].update({"min": 0.5, "max": 0.1})
    config["trainingApproach"]["objective"]["metric"] = "validation:nope"
    body = error(account.http.post("/models", json=config), 400, "INVALID_ARGUMENT")
    violations = {v["field"]: v["description"] for v in body["fieldViolations"]}
    assert "min (0.5) is greater than max (0.1)" in violations["trainingApproach.searchSpace[0].min"], violations
    assert "not among metricDefinitions" in violations["trainingApproach.objective.metric"], violations

    wrong_type = labelled_config(["a", "b"])
    wrong_type["trainingApproach"]["maxTrials"] = "3"
    violations = {v["field"] for v in error(account.http.post("/models", json=wrong_type), 400, "INVALID_ARGUMENT")["fieldViolations"]}
    assert violations == {"trainingApproach.maxTrials"}

    nul = labelled_config(["a", "b"], name="bad\x00name")
    assert error(account.http.post("/models", json=nul), 400, "INVALID_ARGUMENT")["fieldViolations"][0]["field"] == "name"
    not_json = account.http.post("/models", content=b'{"name":', headers={"Content-Type": "application/json"})
    (violation,) = error(not_json, 400, "INVALID_ARGUMENT")["fieldViolations"]
    assert violation["field"] == "(body)" and violation["description"].startswith("not valid JSON at character 8"), violation
    untyped = account.http.post("/models", content=json.dumps(config).encode(), headers={"Content-Type": "text/plain"})
    (violation,) = error(untyped, 400, "INVALID_ARGUMENT")["fieldViolations"]
    assert "Content-Type: application/json" in violation["description"], violation
    assert error(account.http.post("/models", json=[1, 2]), 400, "INVALID_ARGUMENT")["fieldViolations"][0]["field"] == "(config)"
    assert ok(account.http.get("/models")) == {"items": []}, "a rejected config must not be saved"


def test_lists_page_with_page_size_and_next_page_token(stack: Stack, http_base: str, empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    made = [ok(account.http.post("/models", json=labelled_config(["a", "b"], name=f"m{i}")))["model"]["id"] for i in range(5)]
    seen, pages, token = [], [], None
    while True:
        params: dict[str, Any] = {"pageSize": 2} | ({"nextPageToken": token} if token else {})
        page = ok(account.http.get("/models", params=params))
        pages.append(len(page["items"]))
        seen += [m["id"] for m in page["items"]]
        token = page.get("nextPageToken")
        if not token:
            break
    assert pages == [2, 2, 1] and seen == made
    bad = error(account.http.get("/models", params={"nextPageToken": "garbage!"}), 400, "INVALID_ARGUMENT")
    assert [v["field"] for v in bad["fieldViolations"]] == ["nextPageToken"]
    for size in (0, 501, "ten"):
        bad = error(account.http.get("/models", params={"pageSize": size}), 400, "INVALID_ARGUMENT")
        assert [v["field"] for v in bad["fieldViolations"]] == ["pageSize"], size

    runs = [ok(account.http.post(f"/models/{made[0]}/runs"))["runId"] for _ in range(3)]
    first = ok(account.http.get(f"/models/{made[0]}/runs", params={"pageSize": 2}))
    second = ok(account.http.get(f"/models/{made[0]}/runs", params={"pageSize": 2, "nextPageToken": first["nextPageToken"]}))
    assert [r["id"] for r in first["items"] + second["items"]] == runs and "nextPageToken" not in second
    assert ok(account.http.get(f"/models/{made[1]}/runs")) == {"items": []}, "runs are listed per model"


def test_label_ids_and_indexes_are_stable_across_updates(stack: Stack, http_base: str, empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    model = ok(account.http.post("/models", json=labelled_config(["a", "b", "c"])))["model"]

    def labels(body: dict[str, Any]) -> dict[str, tuple[str, int]]:
        return {label["name"]: (label["id"], label["index"]) for label in body["problemDefinition"]["labelDefinition"]["labels"]}

    first = labels(model)
    assert [first[n][1] for n in "abc"] == [0, 1, 2]
    run_id = ok(account.http.post(f"/models/{model['id']}/runs"))["runId"]

    dropped = ok(account.http.put(f"/models/{model['id']}", json=labelled_config(["a", "c", "d"])))
    second = labels(dropped)
    assert second["a"] == first["a"] and second["c"] == first["c"], "kept labels keep their id and index"
    assert second["d"][1] == 3, "a new label takes the next index never used, not b's freed 1"
    assert dropped["maxLabelIndex"] == 3

    back = ok(account.http.put(f"/models/{model['id']}", json=labelled_config(["a", "b", "c", "d"])))
    third = labels(back)
    assert third["b"][1] == 4 and third["b"][0] != first["b"][0], "a dropped label's index is never reused"
    assert {n: third[n] for n in "acd"} == {n: second[n] for n in "acd"}
    assert back["maxLabelIndex"] == 4 and ok(account.http.get(f"/models/{model['id']}")) == back

    run = ok(account.http.get(f"/models/{model['id']}/runs/{run_id}"))
    assert labels(run) == first, "an update never changes a run's copy of the config"


# ---- runs ----------------------------------------------------------------------------------


def test_failed_run_maps_to_failed_with_the_step_and_reason(failed: dict[str, Any]) -> None:
    run = failed["run"]
    assert run["status"] == "failed"
    assert run["error"].startswith("curate: "), run["error"]
    assert run["deployStatus"] == "notDeployed" and run["hyperparameters"] == []
    assert run["metrics"] == {"challenger": [], "champion": []} and run["approvals"] == []
    assert run["end"] >= run["start"]


def test_completed_run_has_the_public_api_shape(completed: dict[str, Any]) -> None:
    run, model, account = completed["run"], completed["model"], completed["account"]
    assert run["modelId"] == model["id"] and run["accountId"] == account.id
    assert run["status"] == "succeeded" and "error" not in run
    assert run["deployStatus"] == "deployed" and "deployError" not in run
    assert re.fullmatch(r"digits-[0-9a-f]{8}", run["slug"]), run["slug"]
    assert isinstance(run["start"], int) and isinstance(run["end"], int) and run["start"] <= run["end"]
    assert abs(run["start"] / 1000 - time.time()) < 3600, "start is in epoch milliseconds"

    params = {p["name"]: p["value"] for p in run["hyperparameters"]}
    assert {"alpha", "epochs", "hidden"} <= set(params) and all(isinstance(v, str) for v in params.values())
    assert int(params["epochs"]) in range(10, 26) and 1e-4 <= float(params["alpha"]) <= 1e-2

    challenger = {(m["name"], m["stage"]): m for m in run["metrics"]["challenger"]}
    accuracy = challenger[("accuracy", "evaluation")]
    assert accuracy["direction"] == "maximize" and 0.8 < accuracy["value"] <= 1
    assert challenger[("validation:accuracy", "training")]["direction"] == "maximize", "direction of the objective"
    assert run["metrics"]["champion"] == [] and "championId" not in run, "the first run has no champion"

    [approval] = run["approvals"]
    assert approval == completed["approval"]
    assert approval["decision"] == "approved" and approval["user"] == "dr-test"
    assert approval["description"] == "good enough" and approval["actor"].startswith("key:")
    assert run["start"] <= approval["timestamp"] <= time.time() * 1000

    config = digits_config("imgClf", max_trials=2)
    assert run["trainingApproach"]["maxTrials"] == 2
    assert run["deployApproach"] == config["deployApproach"]
    assert [label["index"] for label in run["problemDefinition"]["labelDefinition"]["labels"]] == list(range(10))
    assert ok(account.http.get(f"/models/{model['id']}"))["championId"] == run["id"]


def test_approvals_take_decision_or_choice_and_refuse_what_they_must(completed: dict[str, Any],
                                                                     failed: dict[str, Any]) -> None:
    http, model_id, run_id = failed["account"].http, failed["model"]["id"], failed["run"]["id"]
    url = f"/models/{model_id}/runs/{run_id}/approvals"
    # Both spellings are understood: a failed run is then refused for its state (409), not the body.
    for body in ({"decision": "approved"}, {"choice": "APPROVE"}, {"decision": "rejected", "choice": "reject"}):
        assert "COMPLETED" in error(http.post(url, json=body), 409, "FAILED_PRECONDITION")["message"], body
    for body, field in (({}, "decision"), ({"choice": "maybe"}, "choice"), ({"decision": "approved", "choice": "rejected"}, "choice"),
                        ({"decision": "approved", "extra": 1}, "extra")):
        bad = error(http.post(url, json=body), 400, "INVALID_ARGUMENT")
        assert [v["field"] for v in bad["fieldViolations"]] == [field], (body, bad)
    owner = completed["account"].http
    again = owner.post(f"/models/{completed['model']['id']}/runs/{completed['run']['id']}/approvals", json={"decision": "rejected"})
    assert "final" in error(again, 409, "FAILED_PRECONDITION")["message"]
    # A run addressed through another model of the same account is not found.
    other = ok(owner.post("/models", json=labelled_config(["a", "b"], name="other")))["model"]
    error(owner.get(f"/models/{other['id']}/runs/{completed['run']['id']}"), 404, "NOT_FOUND")
    error(owner.post(f"/models/{other['id']}/runs/{completed['run']['id']}/approvals", json={"decision": "approved"}),
          404, "NOT_FOUND")
    assert ok(owner.delete(f"/models/{other['id']}"), 204) is None


def test_deleting_a_model_with_a_running_run_is_409(stack: Stack, http_base: str, empty_folder: Path) -> None:
    account = new_account(stack, http_base, empty_folder)
    model = ok(account.http.post("/models", json=labelled_config(["a", "b"])))["model"]
    run_id = ok(account.http.post(f"/models/{model['id']}/runs"))["runId"]
    response = account.http.delete(f"/models/{model['id']}")
    if response.status_code == 409:  # the run may already have failed (no records): then 204 is right
        assert run_id in error(response, 409, "FAILED_PRECONDITION")["message"]
        wait_run(account, model["id"], run_id, 120)
        response = account.http.delete(f"/models/{model['id']}")
    assert response.status_code == 204, response.text


# ---- predictions and artifacts -------------------------------------------------------------


def test_predict_by_example_id_and_by_image(completed: dict[str, Any]) -> None:
    http, model_id, digits = completed["account"].http, completed["model"]["id"], completed["digits"]
    index = {label["name"]: label["index"] for label in completed["model"]["problemDefinition"]["labelDefinition"]["labels"]}
    newest = sorted(digits.values(), key=lambda d: d.index)[-20:]  # the test split holds the newest
    good = 0
    for digit in newest:
        example_id = classification_example_id(digit)
        by_id = ok(http.post(f"/models/{model_id}/predict", json={"predictionType": "imgClassification", "exampleId": example_id}))
        assert by_id["predictionType"] == "imgClf"
        predictions = by_id["predictions"]
        assert len(predictions) == 10 and all(index[p["value"]] == p["index"] for p in predictions)
        assert [p["confidence"] for p in predictions] == sorted((p["confidence"] for p in predictions), reverse=True)
        good += predictions[0]["value"] == DIGIT_NAMES[digit.digit]
    assert good / len(newest) > 0.7, good

    image = base64.b64encode(png_bytes(newest[0])).decode()
    by_image = ok(http.post(f"/models/{model_id}/predict", json={"image": image}))
    by_id = ok(http.post(f"/models/{model_id}/predict", json={"exampleId": classification_example_id(newest[0])}))
    assert by_image["predictions"][0]["value"] == by_id["predictions"][0]["value"]

    for body, field in (({}, "exampleId"), ({"exampleId": "x", "image": image}, "exampleId"),
                        ({"image": "@@not base64@@"}, "image"), ({"predictionType": "imgSeg", "exampleId": "x"}, "predictionType")):
        bad = error(http.post(f"/models/{model_id}/predict", json=body), 400, "INVALID_ARGUMENT")
        assert [v["field"] for v in bad["fieldViolations"]] == [field], (body, bad)
    error(http.post(f"/models/{model_id}/predict", json={"exampleId": "no-such-example"}), 404, "NOT_FOUND")


def test_predict_without_a_deployment_is_409(failed: dict[str, Any]) -> None:
    response = failed["account"].http.post(f"/models/{failed['model']['id']}/predict", json={"exampleId": "x"})
    assert "no serving deployment" in error(response, 409, "FAILED_PRECONDITION")["message"]


def test_model_artifact_streams_with_a_matching_sha256(completed: dict[str, Any], stack: Stack) -> None:
    account, model_id, run_id = completed["account"], completed["model"]["id"], completed["run"]["id"]
    digest, size = hashlib.sha256(), 0
    with account.http.stream("GET", f"/models/{model_id}/runs/{run_id}/model-artifact") as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/octet-stream"
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
        headers = response.headers
    grpc = stack.client(account.id, account.key)
    expected = grpc.get_run(run_id).artifact_sha256
    grpc.close()
    assert digest.hexdigest() == headers["x-content-sha256"] == expected
    assert headers["etag"] == f'"{expected}"' and int(headers["content-length"]) == size > 0


def test_model_artifact_of_a_run_without_one_is_409(failed: dict[str, Any]) -> None:
    response = failed["account"].http.get(f"/models/{failed['model']['id']}/runs/{failed['run']['id']}/model-artifact")
    assert "no model artifact" in error(response, 409, "FAILED_PRECONDITION")["message"]


# ---- the command ---------------------------------------------------------------------------


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    log = tmp_path / "serve.log"
    env = {**os.environ, "PML_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    for name in ("PML_DATABASE_URL", "PML_REDIS_URL"):
        env.pop(name, None)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pml.cli", "serve", "--grpc-port", "0", "--http-port", "0", "--no-workers"],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
    yield process, log
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_pml_serve_answers_grpc_and_http(serve_process: tuple[subprocess.Popen[str], Path]) -> None:
    process, log = serve_process

    def ports() -> tuple[str, str] | None:
        assert process.poll() is None, log.read_text()
        text = log.read_text()
        grpc = re.search(r"gateway on 127\.0\.0\.1:(\d+)", text)
        http = re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", text)
        return (grpc.group(1), http.group(1)) if grpc and http else None

    grpc_port, http_port = wait_for(ports, 60, "pml serve to print its ports")
    response = httpx.get(f"http://127.0.0.1:{http_port}/v1/patient-ml/models")
    error(response, 401, "UNAUTHENTICATED")
    assert httpx.get(f"http://127.0.0.1:{http_port}/v1/patient-ml/openapi.json").json()["openapi"].startswith("3.")
    assert grpc_port != http_port
