"""The `pml` command line against a real gateway, as a person or a script uses it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.bundle import Bundle

from pml.demo import digits_config
from pml.demo_data import classification_example_id, write_demo_fhir
from pml.v1 import pml_pb2 as pb
from tests.conftest import ROOT, Stack, wait_for


class Cli:
    def __init__(self, stack: Stack, account: str, api_key: str):
        self.env = {
            **os.environ, "PML_TARGET": stack.target, "PML_ACCOUNT": account, "PML_API_KEY": api_key,
            "PML_ADMIN_KEY": stack.admin_key, "COLUMNS": "200",
        }

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pml.cli", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        if ok and done.returncode != 0:
            pytest.fail(f"pml {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture(scope="module")
def cli_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small run made and followed through the CLI only."""
    folder = tmp_path_factory.mktemp("cli-fhir")
    digits = write_demo_fhir(folder)
    client = stack.new_account(folder)
    cli = Cli(stack, client.account, client.api_key)
    config = tmp_path_factory.mktemp("cli") / "model.json"
    config.write_text(json.dumps(digits_config("imgClf", max_trials=1)))
    model = cli.json("models", "create", str(config))
    watched = cli("runs", "create", model["id"], "--watch", "--json")
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    return {"cli": cli, "client": client, "model": model, "events": events, "digits": digits, "config": config}


def test_runs_create_watch_streams_the_run_to_its_end(cli_run: dict[str, Any]) -> None:
    events = cli_run["events"]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), "events arrive once each, in order"
    states = [e["data"]["status"] for e in events if e["type"] == "run.state"]
    assert states[0] == "PENDING" and states[-1] == "COMPLETED"
    assert [e["type"] for e in events].count("trial.finished") == 1


def test_human_watch_shows_trials_and_best_objective(cli_run: dict[str, Any]) -> None:
    run_id = cli_run["events"][0]["runId"]
    shown = cli_run["cli"]("runs", "watch", run_id).stdout
    assert "COMPLETED" in shown
    assert "trials: 1/1 done (0 failed)" in shown
    best = max(e["data"]["objective"] for e in cli_run["events"] if e["type"] == "trial.finished")
    assert f"best objective so far {best:.4f}" in shown
    assert "challenger: " in shown and "validation:accuracy" not in shown.split("challenger: ")[0]


def test_show_list_approve_predict_artifact_and_audit(cli_run: dict[str, Any], tmp_path: Path) -> None:
    cli, model = cli_run["cli"], cli_run["model"]
    run_id = cli_run["events"][0]["runId"]
    shown = cli.json("runs", "show", run_id)
    assert shown["state"] == "RUN_STATE_COMPLETED" and len(shown["trials"]) == 1
    log = cli("runs", "logs", shown["trials"][0]["id"]).stdout
    assert "validation:accuracy=" in log
    assert [r["id"] for r in cli.json("runs", "list", "--model", model["id"])] == [run_id]
    assert [m["id"] for m in cli.json("models", "list")] == [model["id"]]
    assert "imgClf" in cli("models", "list").stdout

    approval = cli.json("runs", "approve", run_id, "--description", "ok", "--user", "dr-a")
    assert approval["decision"] == "DECISION_APPROVED" and approval["actor"].startswith("key:")
    client = cli_run["client"]
    listed = client.approvals.ListApprovals(pb.ListApprovalsRequest(run_id=run_id), metadata=client.metadata).approvals
    assert [(a.id, a.user, a.description) for a in listed] == [(approval["id"], "dr-a", "ok")]
    wait_for(lambda: client.get_run(run_id).deploy_status == "DEPLOYED", 120, "the deployment")

    example = classification_example_id(cli_run["digits"][0])
    prediction = cli.json("predict", model["id"], "--example-id", example)
    assert prediction["problemType"] == "imgClf" and len(prediction["predictions"]) == 10

    target = tmp_path / "model.tar.gz"
    out = cli("artifact", model["id"], "-o", str(target)).stdout
    assert hashlib.sha256(target.read_bytes()).hexdigest() in out
    info = cli.json("artifact", model["id"], "-o", str(target))
    assert info["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert info["runId"] == run_id, "the champion's artifact names the champion run"

    entries = cli.json("audit", "list")
    actions = [(e["action"], e["outcome"], e["interface"]) for e in entries]
    for action in ("model.create", "run.create", "run.approve", "model.predict", "artifact.download"):
        assert (action, "ok", "grpc") in actions, action
    deploys = [e for e in entries if e["action"] == "run.deploy"]
    assert [(e["targetId"], e["outcome"], e["interface"], e["actor"]) for e in deploys] == [
        (run_id, "ok", "worker", approval["actor"])
    ], "the deployment is audited once, for the approver"
    exported = tmp_path / "audit.json"
    summary = cli.json("audit", "export", "-o", str(exported))
    bundle = Bundle.model_validate_json(exported.read_text())
    assert {e.resource.code.text for e in bundle.entry} >= {"run.approve", "artifact.download", "run.deploy"}
    assert summary == {"path": str(exported), "auditEvents": len(bundle.entry), "lastId": int(entries[0]["id"])}

    cancel = cli("runs", "cancel", run_id, "--json", ok=False)
    assert cancel.returncode == 2 and "FAILED_PRECONDITION" in cancel.stdout, "a finished run cannot be cancelled"


def test_errors_name_the_code_and_the_field(cli_run: dict[str, Any], tmp_path: Path) -> None:
    cli = cli_run["cli"]
    bad = json.loads(cli_run["config"].read_text())
    bad["trainingApproach"]["maxTrials"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    done = cli("models", "create", str(path), ok=False)
    assert done.returncode == 2
    assert "INVALID_ARGUMENT" in done.stdout and "trainingApproach.maxTrials" in done.stdout
    missing = cli("runs", "show", "0" * 32, ok=False)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stdout


def test_keys_are_listed_and_revoked_by_the_operator(cli_run: dict[str, Any]) -> None:
    cli, client = cli_run["cli"], cli_run["client"]
    made = cli.json("keys", "create", client.account, "--name", "second")
    keys = cli.json("keys", "list", client.account)
    assert len(keys) == 2 and all("apiKey" not in k for k in keys)
    second = next(k for k in keys if k["name"] == "second")
    revoked_key = cli.json("keys", "revoke", client.account, second["id"])
    assert revoked_key["id"] == second["id"] and "revokeTime" in revoked_key
    revoked = Cli.__new__(Cli)
    revoked.env = {**cli.env, "PML_API_KEY": made["apiKey"]}
    done = revoked("models", "list", ok=False)
    assert done.returncode == 2 and "UNAUTHENTICATED" in done.stdout
    assert cli("models", "list").returncode == 0, "the first key still works"


def test_models_delete_prints_json(cli_run: dict[str, Any]) -> None:
    cli = cli_run["cli"]
    model = cli.json("models", "create", str(cli_run["config"]))
    assert cli.json("models", "delete", model["id"]) == {"modelId": model["id"], "deleted": True}
    assert model["id"] not in [m["id"] for m in cli.json("models", "list")]


def store_cli(stack: Stack) -> Cli:
    """The operator's commands that open the store directly (accounts, images)."""
    cli = Cli(stack, "", "")
    cli.env |= {"PML_HOME": str(stack.home), "PML_DATABASE_URL": stack.app.settings.sqlalchemy_url}
    return cli


def test_accounts_created_at_the_cli_are_audited_and_their_key_works(stack: Stack, tmp_path: Path) -> None:
    cli = store_cli(stack)
    made = cli.json("accounts", "create", "cli-made-account", "--fhir-folder", str(tmp_path))
    assert made["accountId"] == "cli-made-account" and made["apiKey"].startswith("pml_")
    client = stack.client("cli-made-account", made["apiKey"])
    assert client.list_models() == [], "the printed key is the account's"
    entries = client.list_audit(50)
    got = [(e.action, e.target_id, e.outcome, e.actor, e.interface) for e in reversed(entries)]
    assert got == [
        ("account.create", "cli-made-account", "ok", "admin", "cli"),
        ("apikey.create", made["keyId"], "ok", "admin", "cli"),
    ]
    again = cli("accounts", "create", "cli-made-account", "--fhir-folder", str(tmp_path), ok=False)
    assert again.returncode == 2 and "exists already" in again.stdout
    assert client.list_audit(1)[0].outcome == "ALREADY_EXISTS", "a refused create is audited too"
    client.close()


def test_images_list_and_add_print_json(stack: Stack, tmp_path: Path) -> None:
    cli = store_cli(stack)
    (tmp_path / "serve").write_text("#!/bin/sh\n")
    added = cli.json("images", "add", "registry.example/cli-json:1", str(tmp_path))
    assert added == {"uri": "registry.example/cli-json:1", "kind": "process", "path": str(tmp_path.resolve())}
    listed = cli.json("images", "list")
    assert added in listed and all(set(i) == {"uri", "kind", "path"} for i in listed)
