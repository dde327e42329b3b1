"""The `pml` command line against a real gateway, as a person or a script uses it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, cast

import grpc
import pytest
from fhir.resources.bundle import Bundle
from rich.console import Console

from pml import cli_gateway, client as client_module
from pml.client import PmlClient
from pml.demo import digits_config
from pml.demo_data import classification_example_id, write_demo_fhir
from pml.v1 import pml_pb2 as pb
from pml.gateway.server import build_server
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
    assert made["keyId"] == second["id"], "--json names the key's id, to list or revoke it by"

    shown = cli("keys", "create", client.account, "--name", "third").stdout
    third = next(k for k in cli.json("keys", "list", client.account) if k["name"] == "third")
    assert third["id"] in shown and "shown once" in shown, shown


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


# ---- ordinary failures: clear errors, no tracebacks, no partial files ---------------------


def assert_file_error(done: subprocess.CompletedProcess[str], path: Path, reason: str) -> None:
    assert done.returncode == 2, f"exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert f"error: {path}: {reason}" in done.stdout, done.stdout


def test_unreadable_files_are_clear_errors(cli_run: dict[str, Any], tmp_path: Path) -> None:
    cli, model = cli_run["cli"], cli_run["model"]
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"name": "caf\xe9"}')
    assert_file_error(cli("models", "create", str(not_utf8), ok=False), not_utf8, "not UTF-8 text")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    assert_file_error(cli("models", "create", str(deep), ok=False), deep, "JSON nested too deeply")
    missing = tmp_path / "missing.json"
    assert_file_error(cli("models", "update", model["id"], str(missing), ok=False), missing, "No such file")

    image = tmp_path / "nonexistent.png"
    assert_file_error(cli("predict", model["id"], "--image", str(image), ok=False), image, "No such file")
    archive = tmp_path / "no" / "dir" / "a.tgz"
    assert_file_error(cli("artifact", model["id"], "-o", str(archive), ok=False), archive, "No such file")
    bundle = tmp_path / "no" / "x.json"
    assert_file_error(cli("audit", "export", "-o", str(bundle), ok=False), bundle, "No such file")


def test_a_failed_download_leaves_no_file_and_keeps_the_old_one(cli_run: dict[str, Any], tmp_path: Path) -> None:
    cli = cli_run["cli"]
    target = tmp_path / "x.tgz"
    done = cli("artifact", "0" * 32, "-o", str(target), ok=False)
    assert done.returncode == 2 and "NOT_FOUND" in done.stdout, done.stdout
    assert list(tmp_path.iterdir()) == [], "a failed download leaves nothing behind"

    target.write_bytes(b"the artifact downloaded yesterday")
    cli("artifact", "0" * 32, "-o", str(target), ok=False)
    assert target.read_bytes() == b"the artifact downloaded yesterday", "a failed download clobbered the file"
    assert list(tmp_path.iterdir()) == [target]


class FakeArtifacts:
    """An ArtifactService stub whose bytes do not match the sha256 it announces."""

    def DownloadArtifact(self, request: pb.DownloadArtifactRequest, metadata: Any) -> Iterator[pb.ArtifactChunk]:
        yield pb.ArtifactChunk(info=pb.ArtifactInfo(sha256="0" * 64, run_id="r"))
        yield pb.ArtifactChunk(data=b"not what was announced")


def test_a_download_that_fails_its_sha256_leaves_no_file(tmp_path: Path) -> None:
    client = PmlClient("127.0.0.1:1")
    client.artifacts = FakeArtifacts()  # type: ignore[assignment]
    target = tmp_path / "model.tar.gz"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="sha256"):
        client.download_artifact("m", target)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    client.close()


# ---- runs watch through a gateway restart, and its output off a terminal -------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"


class FlakyGateway:
    """A client whose GetRun answers UNAVAILABLE ``outages`` times before each success (a
    gateway restarting around the stream), and whose stream ends with ``stream_error``, if any."""

    def __init__(self, state: int, outages: int = 0, stream_error: grpc.StatusCode | None = None):
        self.run = pb.Run(id="r1", state=state, config_json=json.dumps({"trainingApproach": {"maxTrials": 1}}))
        self.outages = outages
        self.stream_error = stream_error
        self.failures = 0
        self.answers = 0

    def get_run(self, run_id: str) -> pb.Run:
        if self.failures < self.outages * (self.answers + 1):
            self.failures += 1
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        self.answers += 1
        return self.run

    def watch_run(self, run_id: str, after_event_id: int = 0, reconnect_s: float = 0.0) -> Iterator[pb.Event]:
        yield pb.Event(id=1, type="run.state", run_id=run_id, data_json=json.dumps({"status": "RUNNING"}))
        if self.stream_error is not None:
            raise FakeRpcError(self.stream_error)
        status = pb.RunState.Name(self.run.state).removeprefix("RUN_STATE_")
        yield pb.Event(id=2, type="run.state", run_id=run_id, data_json=json.dumps({"status": status}))


@pytest.fixture
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Reconnect pauses of 10 ms, and the CLI's console writing to a buffer (not a terminal)."""
    monkeypatch.setattr(client_module, "RECONNECT_PAUSE_S", 0.01)
    shown = io.StringIO()
    monkeypatch.setattr(cli_gateway, "console", Console(file=shown, width=200))
    return shown


@pytest.mark.parametrize("as_json", [True, False])
def test_watch_rides_out_a_restart_around_the_stream(quick_reconnect: io.StringIO, as_json: bool) -> None:
    gateway = FlakyGateway(pb.RUN_STATE_COMPLETED, outages=3)
    run = cli_gateway.watch_run(cast(PmlClient, gateway), "r1", as_json)
    assert run.state == pb.RUN_STATE_COMPLETED
    assert (gateway.answers, gateway.failures) == (2, 6), "the first and the last GetRun both retried"


def test_watch_gives_up_on_a_gateway_that_stays_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RECONNECT_PAUSE_S", 0.01)
    gone = FlakyGateway(pb.RUN_STATE_COMPLETED, outages=10**9)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError):
        client_module.retrying(lambda: gone.get_run("r1"), 0.2)
    assert time.monotonic() - started < 5, "retried past its time"
    calls: list[int] = []

    def refuse() -> pb.Run:
        calls.append(1)
        raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED)

    with pytest.raises(grpc.RpcError):
        client_module.retrying(refuse, 60)
    assert len(calls) == 1, "only UNAVAILABLE is retried"


def test_watch_output_off_a_terminal_ends_with_a_newline(quick_reconnect: io.StringIO) -> None:
    run = cli_gateway.watch_run(cast(PmlClient, FlakyGateway(pb.RUN_STATE_CANCELLED)), "r1", as_json=False)
    assert run.state == pb.RUN_STATE_CANCELLED
    assert quick_reconnect.getvalue().endswith("CANCELLED\n"), repr(quick_reconnect.getvalue())

    quick_reconnect.truncate(0)
    quick_reconnect.seek(0)
    with pytest.raises(grpc.RpcError):
        cli_gateway.watch_run(
            cast(PmlClient, FlakyGateway(pb.RUN_STATE_COMPLETED, stream_error=grpc.StatusCode.PERMISSION_DENIED)),
            "r1", as_json=False,
        )
    assert quick_reconnect.getvalue().endswith("RUNNING\n"), "the error line that follows starts on its own line"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_runs_watch_waits_for_a_gateway_that_is_restarting(cli_run: dict[str, Any], stack: Stack) -> None:
    """``pml runs watch`` started while the gateway is down: it waits for it, then follows."""
    run_id = cli_run["events"][0]["runId"]
    port = free_port()
    env = {**cli_run["cli"].env, "PML_TARGET": f"127.0.0.1:{port}"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "pml.cli", "runs", "watch", run_id, "--json"], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(3)  # the CLI starts and finds no gateway
    assert watcher.poll() is None, f"watch gave up at once: {watcher.communicate()}"
    server, _ = build_server(stack.app, f"127.0.0.1:{port}")
    try:
        out, err = watcher.communicate(timeout=120)
    finally:
        server.stop(grace=0)
    assert watcher.returncode == 0, f"exited {watcher.returncode}:\n{out}\n{err}"
    assert json.loads(out.splitlines()[-1])["data"]["status"] == "COMPLETED"
