"""The CLI commands that talk to a running gateway over gRPC: what a person does day to day.

Human output by default (rich tables, a live view for ``runs watch``); ``--json`` prints the
API's messages as JSON (camelCase, one object, or one line per event when watching).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pml.client import PmlClient, retrying
from pml.v1 import pml_pb2 as pb

console = Console()
models = typer.Typer(no_args_is_help=True, help="Models of your account (through the gateway).")
runs = typer.Typer(no_args_is_help=True, help="Runs: create, follow, approve or reject (through the gateway).")
keys = typer.Typer(no_args_is_help=True, help="API keys of an account (admin key; through the gateway).")
audit = typer.Typer(no_args_is_help=True, help="Your account's audit log (through the gateway).")

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]


@dataclass
class Remote:
    """Where the gateway is and who calls it; set by the top-level options or PML_* variables."""

    target: str
    account: str
    api_key: str
    admin_key: str

    def client(self) -> PmlClient:
        return PmlClient(self.target, account=self.account, api_key=self.api_key, admin_key=self.admin_key)


def _remote(ctx: typer.Context) -> PmlClient:
    remote = ctx.find_root().obj
    assert isinstance(remote, Remote)
    return remote.client()


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=False)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _state(run: pb.Run) -> str:
    return pb.RunState.Name(run.state).removeprefix("RUN_STATE_")


def _fmt(metrics: Any) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(dict(metrics).items()))


class UnusableFile(Exception):
    """A file named on the command line cannot be read or written; ``pml`` prints
    ``error: <path>: <reason>`` and exits 2 instead of a traceback."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    @classmethod
    def from_os_error(cls, path: Path, exc: OSError) -> "UnusableFile":
        """The reason without Python's ``[Errno 2]`` prefix or the repeated path."""
        return cls(path, exc.strerror or type(exc).__name__)


def _config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnusableFile.from_os_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise UnusableFile(path, f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UnusableFile(path, f"not JSON: {exc}") from None
    except RecursionError:
        # Python's json parser recurses once per nesting level; no model config nests this deep.
        raise UnusableFile(path, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise UnusableFile(path, "a model config is a JSON object")
    return data


def _read_bytes(path: Path) -> bytes:
    """A file the user named (``--image``), its OS error turned into an :class:`UnusableFile`."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UnusableFile.from_os_error(path, exc) from None


def _write(path: Path, data: str | bytes) -> None:
    """Write where the user asked (``--mask``, ``-o``); an OS error becomes an :class:`UnusableFile`."""
    try:
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise UnusableFile.from_os_error(path, exc) from None


# ---- models ------------------------------------------------------------------------------


def _model_table(rows: list[pb.Model]) -> Table:
    table = Table("id", "name", "problem", "labels", "champion run")
    for model in rows:
        config = json.loads(model.config_json)
        problem = config["problemDefinition"]
        labels = ", ".join(label["name"] for label in problem["labelDefinition"]["labels"])
        table.add_row(model.id, model.name, problem["problemType"], labels, model.champion_run_id or "-")
    return table


@models.command("create")
def models_create(ctx: typer.Context, config: Path, as_json: Json = False) -> None:
    """Create a model from a JSON config file."""
    model = _remote(ctx).create_model(_config_file(config))
    print_json(_dict(model)) if as_json else console.print(f"model [bold]{model.id}[/] created ({model.name})")


@models.command("list")
def models_list(ctx: typer.Context, as_json: Json = False) -> None:
    rows = _remote(ctx).list_models()
    print_json([_dict(m) for m in rows]) if as_json else console.print(_model_table(rows))


@models.command("show")
def models_show(ctx: typer.Context, model_id: str, as_json: Json = False) -> None:
    model = _remote(ctx).get_model(model_id)
    if as_json:
        print_json({**_dict(model), "config": json.loads(model.config_json)})
        return
    console.print(_model_table([model]))
    console.print_json(model.config_json)


@models.command("update")
def models_update(ctx: typer.Context, model_id: str, config: Path, as_json: Json = False) -> None:
    """Replace a model's config; labels keep their ids and indexes by name."""
    model = _remote(ctx).update_model(model_id, _config_file(config))
    print_json(_dict(model)) if as_json else console.print(f"model [bold]{model.id}[/] updated")


@models.command("delete")
def models_delete(ctx: typer.Context, model_id: str, as_json: Json = False) -> None:
    """Delete a model (refused while a run is active); its runs' history stays."""
    _remote(ctx).delete_model(model_id)
    print_json({"modelId": model_id, "deleted": True}) if as_json else console.print(f"model {model_id} deleted")


# ---- runs --------------------------------------------------------------------------------


def _run_table(rows: list[pb.Run]) -> Table:
    table = Table("id", "model", "state", "challenger", "champion", "deploy", "created")
    for run in rows:
        table.add_row(
            run.id, run.model_id, _state(run), _fmt(run.challenger_metrics) or "-",
            _fmt(run.champion_metrics) or "-", run.deploy_status or "-",
            run.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


@dataclass
class WatchView:
    """What ``runs watch`` shows, updated from each event of the run's stream."""

    run_id: str
    max_trials: int
    maximize: bool
    state: str = "PENDING"
    examples: int | None = None
    skipped: int | None = None
    started: int = 0
    done: int = 0
    failed: int = 0
    best: float | None = None
    reason: str = ""
    last_event_id: int = 0

    def apply(self, event: pb.Event) -> None:
        data = json.loads(event.data_json or "{}")
        self.last_event_id = event.id
        if event.type == "run.state":
            self.state = data.get("status", self.state)
            self.reason = data.get("reason") or ""
        elif event.type == "run.curated":
            self.examples, self.skipped = data.get("examples"), data.get("skipped")
        elif event.type == "trial.started":
            self.started += 1
        elif event.type == "trial.finished":
            self.done += 1
            if data.get("status") != "COMPLETED":
                self.failed += 1
            value = data.get("objective")
            if data.get("status") == "COMPLETED" and isinstance(value, (int, float)):
                if self.best is None or (value > self.best if self.maximize else value < self.best):
                    self.best = float(value)

    def render(self) -> Group:
        lines = [Text.assemble(("run ", "dim"), (self.run_id, "bold"), "  ", (self.state, "bold cyan"))]
        if self.examples is not None:
            lines.append(Text(f"curated: {self.examples} examples, {self.skipped} records skipped"))
        if self.started:
            best = f"{self.best:.4f}" if self.best is not None else "-"
            lines.append(Text(
                f"trials: {self.done}/{self.max_trials} done ({self.failed} failed), "
                f"{self.started - self.done} running; best objective so far {best}"
            ))
        if self.reason:
            lines.append(Text(f"reason: {self.reason}", style="red"))
        return Group(*lines)


# How long `runs watch` keeps reconnecting to a gateway that went away (a restart, say).
WATCH_RECONNECT_S = 60.0


def watch_run(client: PmlClient, run_id: str, as_json: bool, after_event_id: int = 0) -> pb.Run:
    """Follow a run until it ends, reconnecting without loss if the gateway restarts;
    returns the finished run.

    ``after_event_id`` skips what a script has already seen (``--json`` lines carry ids). The
    live view always replays the run's whole history, cheap and short, so its trial counts
    and best objective are right however it was started.
    """
    # The stream rides out a gateway restart; so must the calls around it, or a watch that
    # followed the run to its end would still fail on the last one.
    run = retrying(lambda: client.get_run(run_id), WATCH_RECONNECT_S)
    approach = json.loads(run.config_json or "{}").get("trainingApproach", {})
    view = WatchView(
        run_id=run_id, max_trials=int(approach.get("maxTrials", 0)),
        maximize=approach.get("objective", {}).get("direction", "maximize").lower() == "maximize",
    )
    if as_json:
        for event in client.watch_run(run_id, after_event_id, reconnect_s=WATCH_RECONNECT_S):
            print(json.dumps(_dict(event) | {"data": json.loads(event.data_json or "{}")}), flush=True)
        return retrying(lambda: client.get_run(run_id), WATCH_RECONNECT_S)
    try:
        with Live(view.render(), console=console, refresh_per_second=8) as live:
            for event in client.watch_run(run_id, reconnect_s=WATCH_RECONNECT_S):
                view.apply(event)
                live.update(view.render())
    finally:
        # Off a terminal, rich leaves the last rendering without its newline; what comes next
        # (the metrics, an error line) would be glued to it.
        if not console.is_terminal:
            console.line()
    run = retrying(lambda: client.get_run(run_id), WATCH_RECONNECT_S)
    if run.challenger_metrics:
        console.print(f"challenger: {_fmt(run.challenger_metrics)}")
    if run.has_champion_metrics:
        console.print(f"champion:   {_fmt(run.champion_metrics)}")
    return run


@runs.command("create")
def runs_create(
    ctx: typer.Context, model_id: str,
    watch: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = False,
    as_json: Json = False,
) -> None:
    client = _remote(ctx)
    run = client.create_run(model_id)
    if as_json and not watch:
        print_json(_dict(run))
        return
    if not as_json:
        console.print(f"run [bold]{run.id}[/] created")
    if watch:
        _exit_with_run(watch_run(client, run.id, as_json))


def _exit_with_run(run: pb.Run) -> None:
    """`runs watch` exits 0 for a COMPLETED run and 1 otherwise, for scripts."""
    if run.state != pb.RUN_STATE_COMPLETED:
        raise typer.Exit(1)


@runs.command("watch")
def runs_watch(
    ctx: typer.Context, run_id: str,
    after: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="With --json: resume after this event id (from an earlier line).")] = 0,
    as_json: Json = False,
) -> None:
    """Live progress of a run (state, trials done, best objective so far) until it ends."""
    _exit_with_run(watch_run(_remote(ctx), run_id, as_json, after))


@runs.command("list")
def runs_list(
    ctx: typer.Context, model: Annotated[Optional[str], typer.Option(help="Only this model's runs.")] = None,
    as_json: Json = False,
) -> None:
    rows = _remote(ctx).list_runs(model or "")
    print_json([_dict(r) for r in rows]) if as_json else console.print(_run_table(rows))


@runs.command("show")
def runs_show(ctx: typer.Context, run_id: str, as_json: Json = False) -> None:
    client = _remote(ctx)
    run = client.get_run(run_id)
    trials = client.list_trials(run_id)
    if as_json:
        print_json({**_dict(run), "trials": [_dict(t) for t in trials]})
        return
    console.print(_run_table([run]))
    if run.failure_reason:
        console.print(f"[red]{run.failed_step} failed:[/] {run.failure_reason}", highlight=False)
    table = Table("trial", "status", "objective", "hyperparameters", "reason")
    for trial in trials:
        table.add_row(
            str(trial.number), trial.status, f"{trial.objective:.4f}" if trial.has_objective else "-",
            ", ".join(f"{k}={v}" for k, v in sorted(trial.hyperparameters.items())), trial.failure_reason[:80],
        )
    console.print(table)


@runs.command("logs")
def runs_logs(
    ctx: typer.Context, trial_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the trial ends.")] = False,
    offset: Annotated[int, typer.Option(min=0, help="Start at this byte offset (from an earlier --json line).")] = 0,
    as_json: Json = False,
) -> None:
    """A trial's training log (stdout and stderr of the image), as it is written."""
    for line in _remote(ctx).trial_logs(trial_id, offset, follow):
        if as_json:
            print(json.dumps({"text": line.text, "nextOffset": line.next_offset}), flush=True)
        else:
            print(line.text, flush=True)


@runs.command("cancel")
def runs_cancel(ctx: typer.Context, run_id: str, as_json: Json = False) -> None:
    run = _remote(ctx).cancel_run(run_id)
    print_json(_dict(run)) if as_json else console.print(f"run {run.id} {_state(run)}")


def _decide(ctx: typer.Context, run_id: str, approved: bool, description: str, user: str, as_json: bool) -> None:
    approval = _remote(ctx).approve(run_id, description, user, approved=approved)
    if as_json:
        print_json(_dict(approval))
    else:
        console.print(f"run {run_id} {'approved' if approved else 'rejected'} (approval {approval.id})")


@runs.command("approve")
def runs_approve(ctx: typer.Context, run_id: str, description: str = "", user: str = "", as_json: Json = False) -> None:
    """Approve a completed run: its model becomes the champion and is deployed."""
    _decide(ctx, run_id, True, description, user, as_json)


@runs.command("reject")
def runs_reject(ctx: typer.Context, run_id: str, description: str = "", user: str = "", as_json: Json = False) -> None:
    _decide(ctx, run_id, False, description, user, as_json)


# ---- predictions and artifacts -----------------------------------------------------------


def predict(
    ctx: typer.Context, model_id: str,
    example_id: Annotated[Optional[str], typer.Option(help="A curated example's DocumentReference id.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="A PNG or JPEG file.")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Segmentation: write the predicted mask PNG here.")] = None,
    as_json: Json = False,
) -> None:
    """Predict with the model's deployed champion."""
    if (example_id is None) == (image is None):
        raise typer.BadParameter("give exactly one of --example-id or --image")
    result = _remote(ctx).predict(model_id, example_id=example_id, image=_read_bytes(image) if image else None)
    if mask is not None and result.mask_png:
        _write(mask, result.mask_png)
    if as_json:
        out = _dict(result)
        out.pop("maskPng", None)
        print_json(out)
        return
    table = Table("index", "label", "confidence", title=result.problem_type)
    for p in result.predictions:
        table.add_row(str(p.index), p.value, f"{p.confidence:.4f}")
    console.print(table)


def artifact(
    ctx: typer.Context, model_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write model.tar.gz.")],
    run: Annotated[str, typer.Option(help="A run's artifact instead of the champion's.")] = "",
    as_json: Json = False,
) -> None:
    """Download a model artifact; its sha256 is checked against the server's."""
    try:
        info = _remote(ctx).download_artifact(model_id, output, run)
    except OSError as exc:
        raise UnusableFile.from_os_error(output, exc) from None
    if as_json:
        print_json({**_dict(info), "path": str(output)})
    else:
        console.print(f"{output} sha256 {info.sha256} (run {info.run_id})")


# ---- keys (admin) and audit --------------------------------------------------------------


@keys.command("create")
def keys_create(ctx: typer.Context, account_id: str, name: str = "", as_json: Json = False) -> None:
    """Make a key for an account; it is shown once."""
    made = _remote(ctx).new_api_key(account_id, name)
    if as_json:
        print_json({"accountId": account_id, "keyId": made.key_id, "apiKey": made.api_key})
    else:
        console.print(f"key {made.key_id} created; API key (shown once): {made.api_key}", highlight=False)


@keys.command("list")
def keys_list(ctx: typer.Context, account_id: str, as_json: Json = False) -> None:
    rows = _remote(ctx).list_api_keys(account_id)
    if as_json:
        print_json([_dict(k) for k in rows])
        return
    table = Table("id", "name", "created", "revoked")
    for key in rows:
        revoked = key.revoke_time.ToDatetime().isoformat() if key.HasField("revoke_time") else "-"
        table.add_row(key.id, key.name, key.create_time.ToDatetime().isoformat(), revoked)
    console.print(table)


@keys.command("revoke")
def keys_revoke(ctx: typer.Context, account_id: str, key_id: str, as_json: Json = False) -> None:
    key = _remote(ctx).revoke_api_key(account_id, key_id)
    print_json(_dict(key)) if as_json else console.print(f"key {key_id} revoked")


@audit.command("list")
def audit_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=500)] = 50, as_json: Json = False,
) -> None:
    """The newest entries of your account's audit log."""
    rows = _remote(ctx).list_audit(limit)
    if as_json:
        print_json([_dict(e) for e in rows])
        return
    table = Table("id", "when", "actor", "action", "target", "outcome", "via")
    for e in rows:
        table.add_row(str(e.id), e.create_time.ToDatetime().isoformat(), e.actor, e.action,
                      f"{e.target_type} {e.target_id}".strip(), e.outcome, e.interface)
    console.print(table)


@audit.command("export")
def audit_export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the FHIR Bundle (JSON).")],
    after: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Only entries after this id.")] = 0,
    as_json: Json = False,
) -> None:
    """Export the audit log as a FHIR Bundle of AuditEvent resources."""
    answer = _remote(ctx).export_audit(after)
    _write(output, answer.bundle_json)
    count = len(json.loads(answer.bundle_json).get("entry", []))
    if as_json:  # the Bundle is in the file; this says how far it got, for the next --after
        print_json({"path": str(output), "auditEvents": count, "lastId": answer.last_id})
    else:
        console.print(f"{count} AuditEvents written to {output}; next export: --after {answer.last_id}")


def register(app: typer.Typer) -> None:
    """Add these commands to the top-level ``pml`` command."""
    app.add_typer(models, name="models")
    app.add_typer(runs, name="runs")
    app.add_typer(keys, name="keys")
    app.add_typer(audit, name="audit")
    app.command("predict")(predict)
    app.command("artifact")(artifact)
