"""``pml``: the command line for operators and people (typer + rich)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pml import cli_gateway
from pml.cli_gateway import Json, print_json
from pml.settings import Settings

if TYPE_CHECKING:
    import grpc

    from pml.app import App
    from pml.store.tables import Image

app = typer.Typer(no_args_is_help=True, help="pml: patient ML service.")
images = typer.Typer(no_args_is_help=True, help="The image registry (image URI → local folder or Docker image).")
accounts = typer.Typer(no_args_is_help=True, help="Accounts and API keys (operator, local store).")
app.add_typer(images, name="images")
app.add_typer(accounts, name="accounts")
cli_gateway.register(app)
console = Console()


@app.callback()
def _gateway_options(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(envvar="PML_TARGET", help="The gateway's gRPC address.")] = "127.0.0.1:50051",
    account: Annotated[str, typer.Option(envvar="PML_ACCOUNT", help="Your account id.")] = "",
    api_key: Annotated[str, typer.Option(envvar="PML_API_KEY", help="Your API key.")] = "",
    admin_key: Annotated[str, typer.Option(envvar="PML_ADMIN_KEY", help="The operator's admin key (keys commands).")] = "",
) -> None:
    """Options for the commands that call a gateway (models, runs, predict, artifact, keys, audit)."""
    ctx.obj = cli_gateway.Remote(target=target, account=account, api_key=api_key, admin_key=admin_key)


def _app() -> "App":
    """The store and broker from the environment (imported late: `pml --help` stays fast)."""
    from pml.app import App

    return App(Settings())


def _image_json(image: "Image") -> dict[str, str]:
    return {"uri": image.uri, "kind": image.kind, "path": image.path or ""}


# How long a stopping pml serve lets in-flight steps finish.
SHUTDOWN_WAIT_MS = 10_000


@app.command()
def serve(
    grpc_port: Annotated[int, typer.Option(min=0, max=65535, help="gRPC port (0 picks a free one).")] = 50051,
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP/JSON API port (0 picks a free one).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless told otherwise.")] = "127.0.0.1",
    workers: Annotated[bool, typer.Option(help="Also run the workers in this process (embedded).")] = True,
) -> None:
    """Start the gRPC gateway and the HTTP/JSON API (and, embedded, the workers)."""
    from pml.gateway.server import build_server
    from pml.http.server import start_http_server
    from pml.workers import start_workers

    pml_app = _app()
    worker = start_workers(pml_app) if workers else None
    server, port = build_server(pml_app, f"{host}:{grpc_port}")
    try:
        http = start_http_server(pml_app, host, http_port)
    except BaseException:
        server.stop(grace=0)
        if worker:
            worker.stop()
        raise
    console.print(f"pml gateway on {host}:{port}" + (" with in-process workers" if worker else ""))
    console.print(f"pml HTTP API on http://{host}:{http.port}/v1/patient-ml (OpenAPI: /v1/patient-ml/openapi.json)")
    if worker and pml_app.settings.embedded_broker:
        # In-memory queues died with the last process; the store says what was in flight.
        from pml.recovery import resume_unfinished

        resumed = resume_unfinished(pml_app)
        if resumed.total:
            console.print(f"picked up unfinished work: {resumed.curate + resumed.tune + resumed.evaluate} run(s), "
                          f"{resumed.deploy} deployment(s), {resumed.notify} webhook delivery(ies)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    busy = False
    if worker:
        # Workers first, while the ports are still held: a second embedded pml serve cannot
        # start on the same store while this one still works it. Steps that do not finish in
        # time stop with the process; the next start picks them up again (pml/recovery.py).
        worker.stop(timeout=SHUTDOWN_WAIT_MS)
        busy = any(thread.is_alive() for thread in worker.workers)
    http.stop()
    server.stop(grace=5).wait()
    if busy:
        # A step still runs (a tuning experiment, say): shutting Ray down under it would fail
        # its run, and the interpreter's teardown aborts in Ray's threads. Leave at once, as a
        # crash would; Ray ends its trials when its driver is gone.
        console.print("stopped with steps still running; the next start picks them up")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if worker:
        from pml.tuning.tuner import shutdown_ray

        shutdown_ray()


@app.command()
def worker(
    queues: Annotated[Optional[list[str]], typer.Option("--queues", "-q", help="Queues to consume (repeat or comma-separate); default all.")] = None,
    processes: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="Threads per process.")] = 2,
) -> None:
    """Consume step queues (curate, tune, evaluate, deploy) as a separate worker pool."""
    from pml.broker import STEPS
    from pml.workers import run_worker_process, spawn_worker_processes

    wanted = sorted({q.strip() for item in (queues or []) for q in item.split(",") if q.strip()})
    unknown = [q for q in wanted if q not in STEPS]
    if unknown:
        raise typer.BadParameter(f"unknown queue(s) {unknown}; choose from {sorted(STEPS)}", param_hint="--queues")
    if processes > 1:
        raise typer.Exit(spawn_worker_processes(wanted, processes, threads))
    pml_app = _app()
    console.print(f"pml worker: queues {', '.join(wanted or sorted(STEPS))}, {threads} threads", highlight=False)
    run_worker_process(pml_app, set(wanted) or None, threads)


@images.command("add")
def images_add(
    uri: str,
    target: Annotated[Optional[str], typer.Argument(
        help="A folder with the train/serve entry points (process runtime), or docker://REFERENCE "
             "(an image in the local Docker engine).", show_default=False)] = None,
    docker: Annotated[bool, typer.Option(
        "--docker", help="Run URI as a Docker image (same as docker://URI).")] = False,
    check: Annotated[bool, typer.Option(
        help="Docker: check that the local engine holds the image (skip when the images live on "
             "other hosts, e.g. Ray GPU nodes).")] = True,
    as_json: Json = False,
) -> None:
    """Register an image URI: a local folder (process runtime) or a Docker image (docker runtime)."""
    from pml.images import DOCKER_SCHEME, add_docker_image, add_image

    if target is not None and target.startswith(DOCKER_SCHEME):
        if docker:
            raise typer.BadParameter("give either --docker or a docker:// target, not both")
        reference: str | None = target[len(DOCKER_SCHEME):]
        if not reference:
            raise typer.BadParameter("docker:// needs an image reference, e.g. docker://pml-sklearn-image:train")
        docker = True
    elif docker:
        if target is not None:
            raise typer.BadParameter("--docker runs the URI itself; for another reference use docker://REFERENCE")
        reference = None
    elif target is None:
        raise typer.BadParameter("give a folder, docker://REFERENCE or --docker")
    if docker:
        from pml.runtimes.docker import check_image

        with _app().session() as session:
            shown = _image_json(add_docker_image(session, uri, reference, check=check_image if check else None))
    else:
        assert target is not None
        with _app().session() as session:
            shown = _image_json(add_image(session, uri, Path(target)))
    if as_json:
        print_json(shown)
    elif shown["kind"] == "docker":
        console.print(f"{shown['uri']} → docker image {shown['path']} (docker runtime)")
    else:
        console.print(f"{shown['uri']} → {shown['path']} ({shown['kind']} runtime)")


@images.command("list")
def images_list(as_json: Json = False) -> None:
    from pml.images import list_images

    with _app().session() as session:
        rows = [_image_json(image) for image in list_images(session)]
    if as_json:
        print_json(rows)
        return
    table = Table("uri", "runtime", "folder or docker image")
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(row["uri"], row["kind"], row["path"])
    console.print(table)


@accounts.command("create")
def accounts_create(
    account_id: str,
    fhir_folder: Annotated[Optional[Path], typer.Option(help="Folder of the account's FHIR records.")] = None,
    fhir_server: Annotated[Optional[str], typer.Option(help="Base URL of the account's FHIR server.")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="PML_FHIR_TOKEN", help="Bearer token for the FHIR server.")] = None,
    mode: Annotated[str, typer.Option(help="FHIR server: 'search' or 'bulk' ($export).")] = "search",
    attachment_host: Annotated[Optional[list[str]], typer.Option(help="Host that http(s) attachments may come from (repeat).")] = None,
    name: str = "",
    as_json: Json = False,
) -> None:
    """Create an account and print its first API key (shown once); both are audited (via cli)."""
    from pml import commands

    if (fhir_folder is None) == (fhir_server is None):
        raise typer.BadParameter("give exactly one of --fhir-folder or --fhir-server")
    source: dict[str, object] = {"attachmentHosts": attachment_host or []}
    if fhir_folder is not None:
        source.update(type="folder", path=str(fhir_folder.resolve()))
    else:
        source.update(type="server", baseUrl=fhir_server, mode=mode, **({"token": token} if token else {}))
    pml_app = _app()
    operator = commands.Caller.admin(account_id, "cli")  # whoever may open the store is the operator
    commands.create_account(pml_app, operator, name, source)
    key, plaintext = commands.create_api_key(pml_app, operator, "first key")
    if as_json:
        print_json({"accountId": account_id, "keyId": key.id, "apiKey": plaintext})
    else:
        console.print(f"account [bold]{account_id}[/] created; API key (shown once): {plaintext}", highlight=False)


@app.command()
def demo() -> None:
    """Run the whole flow once on scikit-learn's digits, through the gateway (embedded)."""
    from pml.demo import run_demo

    raise typer.Exit(run_demo(Settings()))


def _grpc_error(exc: "grpc.RpcError") -> str:
    """A gateway error as a person reads it: the code, the message, each bad field."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    text = f"{exc.code().name}: {exc.details()}"
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            text += "".join(f"\n  {v.field}: {v.description}" for v in bad.field_violations)
    return text


def main() -> None:
    import grpc
    from sqlalchemy.exc import OperationalError

    from pml.client import ArtifactMismatch
    from pml.errors import PmlError, PortInUse

    try:
        app()
    except (PmlError, PortInUse, cli_gateway.UnusableFile, ArtifactMismatch) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
    except grpc.RpcError as exc:
        console.print(f"[red]error:[/] {_grpc_error(exc)}", highlight=False)
        raise SystemExit(2) from None
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        console.print(f"[red]error:[/] cannot use the database ({first}); check PML_DATABASE_URL", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
