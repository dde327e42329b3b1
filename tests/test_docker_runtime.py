"""The docker runtime on a real Docker engine: layout, logs, limits, no network, cleanup, serving.

Needs a running engine and the example images (``scripts/docker-engine``, ``scripts/docker-images``;
.ci/run runs both). In CI a missing engine or image fails these tests; elsewhere they skip.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import docker
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pml.errors import StepFailed
from pml.images import ResolvedImage
from pml.runtimes.base import FAILURE_CHARS, TrainingJob, TrainingOutcome
from pml.runtimes.docker import ENDPOINT_LABEL, OWNER_LABEL, ROLE_LABEL, DockerRuntime
from tests.conftest import ROOT, missing, wait_for

pytestmark = pytest.mark.docker

TRAIN_REF = "pml-sklearn-image:train"
SERVE_REF = "pml-sklearn-image:serve"
PROBE_REF = "pml-test-probe:latest"
LABELS = ["zero", "one", "two"]
# Small and quick: a handful of 8x8 digits, a few epochs.
SMALL_HYPERPARAMETERS = {"epochs": "3", "image_size": "8", "hidden": "0", "shift": "0"}

# A training image whose "train" does what its "mode" hyperparameter says, to probe the runtime.
PROBE_TRAIN = textwrap.dedent('''\
    #!/usr/bin/env python3
    import json, os, socket, sys, time
    hp = json.load(open("/opt/ml/input/config/hyperparameters.json"))
    mode = hp.get("mode", "")
    print("interfaces=" + ",".join(sorted(os.listdir("/sys/class/net"))), flush=True)
    if mode == "network":
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", int(hp["port"])))
            print("connect=ok", flush=True)
        except OSError as exc:
            print("connect=failed " + type(exc).__name__, flush=True)
    elif mode == "sleep":
        print("sleeping", flush=True)
        time.sleep(3600)
    elif mode == "fail":
        with open("/opt/ml/output/failure", "w") as f:
            f.write("bad hyperparameter: " + "x" * 2000)
        sys.exit(3)
    elif mode == "interleave":
        # A stdout line in two writes with a whole stderr line between them.
        sys.stdout.write("epoch=1 sco"); sys.stdout.flush(); time.sleep(0.3)
        print("epoch=1 loss=0.5", file=sys.stderr, flush=True); time.sleep(0.3)
        print("re=0.9", flush=True)
        print("cpus=" + os.environ["SM_NUM_CPUS"], flush=True)
    elif mode == "memory":
        hog = []
        for _ in range(64):
            hog.append(bytearray(16 * 1024 * 1024))
            for i in range(0, len(hog[-1]), 4096):
                hog[-1][i] = 1
        print("allocated", flush=True)
''')


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        missing(f"no Docker engine answers ({exc}); run scripts/docker-engine")
    for reference in (TRAIN_REF, SERVE_REF):
        try:
            client.images.get(reference)
        except docker.errors.ImageNotFound:
            missing(f"docker image {reference} is missing; run scripts/docker-images")
    yield client
    client.close()


@pytest.fixture(scope="session")
def probe_image(engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("probe-image")
    (context / "train").write_text(PROBE_TRAIN)
    (context / "Dockerfile").write_text(
        "FROM pml-base\nENV PATH=/opt/program:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "COPY train /opt/program/train\nRUN chmod 0755 /opt/program/train\nCMD [\"train\"]\n"
    )
    engine.images.build(path=str(context), tag=PROBE_REF, rm=True)
    return PROBE_REF


def _pml_containers(engine: docker.DockerClient) -> dict[str, str]:
    return {c.id: c.name for c in engine.containers.list(all=True, filters={"label": ROLE_LABEL})}


@pytest.fixture(autouse=True)
def no_container_left(engine: docker.DockerClient) -> Iterator[None]:
    """Every test must leave no container of pml's behind (what the runtime promises)."""
    before = _pml_containers(engine)
    yield
    left = {cid: name for cid, name in _pml_containers(engine).items() if cid not in before}
    for cid in left:
        engine.containers.get(cid).remove(force=True)
    assert not left, f"containers left behind: {sorted(left.values())}"


def _write_channel(folder: Path, images: np.ndarray, targets: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({
        "problemType": "imgClassification", "multiLabel": False,
        "labels": [{"name": n, "index": i} for i, n in enumerate(LABELS)],
    }))
    rows = []
    for i, (pixels, target) in enumerate(zip(images, targets)):
        Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8), "L").save(folder / f"{i}.png")
        rows.append(json.dumps({"id": f"d{i}", "image": f"{i}.png", "labels": [LABELS[target]], "mask": None}))
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    digits = load_digits(n_class=len(LABELS))
    root = tmp_path_factory.mktemp("channels")
    return {
        "train": _write_channel(root / "train", digits.images[:90], digits.target[:90]),
        "validation": _write_channel(root / "validation", digits.images[90:120], digits.target[90:120]),
    }


def _image(reference: str) -> ResolvedImage:
    return ResolvedImage(uri=f"test.example/{reference}", kind="docker", path=None, reference=reference)


def _job(tmp_path: Path, reference: str, channels: dict[str, Path], **hyperparameters: str) -> TrainingJob:
    return TrainingJob(image=_image(reference), folder=tmp_path / "trial", channels=channels,
                       hyperparameters=hyperparameters)


def _train(job: TrainingJob) -> tuple[TrainingOutcome, list[str]]:
    lines: list[str] = []
    outcome = DockerRuntime().train(job, lines.append)
    return outcome, lines


def _running_of(engine: docker.DockerClient, owner_pid: int) -> list[Any]:
    owner = f"{socket.gethostname()}:{owner_pid}"
    return engine.containers.list(filters={"label": f"{OWNER_LABEL}={owner}", "status": "running"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, engine: docker.DockerClient,
            channels: dict[str, Path]) -> tuple[TrainingJob, TrainingOutcome, list[str]]:
    job = _job(tmp_path_factory.mktemp("trained"), TRAIN_REF, channels, **SMALL_HYPERPARAMETERS)
    outcome, lines = _train(job)
    return job, outcome, lines


def test_training_container_gets_the_layout_streams_metrics_and_writes_the_model(
    trained: tuple[TrainingJob, TrainingOutcome, list[str]],
) -> None:
    job, outcome, lines = trained
    assert outcome.succeeded, f"training failed: {outcome.failure} | {outcome.log_tail}"
    metric_lines = [line for line in lines if "validation:accuracy=" in line]
    assert [line.split()[0] for line in metric_lines] == ["epoch=1", "epoch=2", "epoch=3"], lines
    assert (job.model_dir / "model.pkl").is_file(), "the model did not reach /opt/ml/model"
    meta = json.loads((job.model_dir / "model.json").read_text())
    # The image read /opt/ml/input/config/hyperparameters.json (its default image_size is 16).
    assert meta["hyperparameters"]["image_size"] == 8 and meta["hyperparameters"]["epochs"] == 3
    assert [label["name"] for label in meta["labels"]] == LABELS, "the train channel was not mounted"
    assert (job.model_dir / "model.pkl").stat().st_uid == os.getuid(), "model files belong to another user"
    assert "validation:accuracy=" in (job.folder / "logs" / "train.log").read_text()


def test_training_container_has_no_network(tmp_path: Path, probe_image: str, channels: dict[str, Path]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # something to reach on the host
        port = listener.getsockname()[1]
        outcome, lines = _train(_job(tmp_path, probe_image, channels, mode="network", port=str(port)))
    assert outcome.succeeded, outcome.log_tail
    assert "interfaces=lo" in lines, f"the training container has network interfaces: {lines}"
    assert any(line.startswith("connect=failed") for line in lines), f"reached the host from training: {lines}"


def test_memory_and_cpu_limits_are_applied(tmp_path: Path, engine: docker.DockerClient, probe_image: str,
                                           channels: dict[str, Path]) -> None:
    job = _job(tmp_path, probe_image, channels, mode="sleep")
    job.memory_bytes, job.cpus, job.timeout_s = 300 * 2**20, 0.5, 60
    result: list[TrainingOutcome] = []
    worker = threading.Thread(target=lambda: result.append(_train(job)[0]))
    worker.start()
    try:
        container = wait_for(lambda: _running_of(engine, os.getpid()), 60, "the training container")[0]
        host_config = container.attrs["HostConfig"]
        assert host_config["Memory"] == 300 * 2**20
        assert host_config["NanoCpus"] == 500_000_000
        assert host_config["NetworkMode"] == "none"
        container.stop(timeout=1)  # ends the job early; the runtime removes the container
    finally:
        worker.join(60)
    assert result and not result[0].succeeded


def test_stdout_and_stderr_lines_stay_whole_when_they_interleave(tmp_path: Path, probe_image: str,
                                                               channels: dict[str, Path]) -> None:
    job = _job(tmp_path, probe_image, channels, mode="interleave")
    job.cpus = 2
    outcome, lines = _train(job)
    assert outcome.succeeded, outcome.log_tail
    assert "epoch=1 score=0.9" in lines and "epoch=1 loss=0.5" in lines, lines
    assert "cpus=2" in lines, "SM_NUM_CPUS is the job's CPU count"


def test_training_over_its_memory_limit_fails_with_the_reason(tmp_path: Path, probe_image: str,
                                                              channels: dict[str, Path]) -> None:
    job = _job(tmp_path, probe_image, channels, mode="memory")  # allocates 1 GiB
    job.memory_bytes = 128 * 2**20
    outcome, lines = _train(job)
    assert "allocated" not in lines
    assert outcome.exit_code != 0 and outcome.failure and "out of memory" in outcome.failure, outcome


def test_timeout_stops_and_removes_the_container(tmp_path: Path, engine: docker.DockerClient, probe_image: str,
                                                 channels: dict[str, Path]) -> None:
    job = _job(tmp_path, probe_image, channels, mode="sleep")
    job.timeout_s = 3
    outcome, lines = _train(job)
    assert "sleeping" in lines
    assert outcome.timed_out and not outcome.succeeded
    assert not _running_of(engine, os.getpid())  # the fixture also checks it was removed


def test_failure_reason_comes_from_the_failure_file(tmp_path: Path, probe_image: str,
                                                    channels: dict[str, Path]) -> None:
    outcome, _ = _train(_job(tmp_path, probe_image, channels, mode="fail"))
    assert outcome.exit_code == 3
    assert outcome.failure is not None and outcome.failure.startswith("bad hyperparameter: xxx")
    assert len(outcome.failure) == FAILURE_CHARS


def test_missing_image_fails_the_job_with_the_reason(tmp_path: Path, engine: docker.DockerClient,
                                                     channels: dict[str, Path]) -> None:
    outcome, _ = _train(_job(tmp_path, "pml-no-such-image:never", channels))
    assert outcome.exit_code != 0
    assert outcome.failure and "'pml-no-such-image:never' is not in the Docker engine" in outcome.failure


def test_assigned_gpus_are_requested_from_the_engine(tmp_path: Path, engine: docker.DockerClient,
                                                     probe_image: str, channels: dict[str, Path]) -> None:
    if "nvidia" in engine.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime: the request would be granted")
    job = _job(tmp_path, probe_image, channels)
    job.gpu_ids = ["0"]
    outcome, _ = _train(job)
    # Without a GPU driver the engine refuses the device request; had the runtime dropped
    # the GPU ids, the job would have run and succeeded.
    assert not outcome.succeeded
    assert outcome.failure and "could not start the training container" in outcome.failure, outcome.failure


OWNER_SCRIPT = textwrap.dedent('''\
    import json, sys
    from pathlib import Path
    from pml.images import ResolvedImage
    from pml.runtimes.base import TrainingJob
    from pml.runtimes.docker import DockerRuntime
    folder, reference, channels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    image = ResolvedImage(uri="test.example/probe", kind="docker", path=None, reference=reference)
    job = TrainingJob(image=image, folder=Path(folder), hyperparameters={"mode": "sleep"},
                      channels={k: Path(v) for k, v in channels.items()}, timeout_s=600)
    DockerRuntime().train(job, print)
''')


def test_sigkill_of_the_owning_process_still_removes_the_container(
    tmp_path: Path, engine: docker.DockerClient, probe_image: str, channels: dict[str, Path],
) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(tmp_path / "trial"), probe_image,
         json.dumps({k: str(v) for k, v in channels.items()})],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        container = wait_for(lambda: _running_of(engine, owner.pid), 60, "the owner's container")[0]
        os.killpg(owner.pid, signal.SIGKILL)  # as Ray does to a stopped trial's worker
        owner.wait(10)

        def gone() -> bool:
            try:
                engine.containers.get(container.id)
                return False
            except docker.errors.NotFound:
                return True

        wait_for(gone, 30, f"container {container.name} to be removed after its owner was killed")
    finally:
        if owner.poll() is None:
            owner.kill()


def _post(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{endpoint}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _external_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_inference_container_serves_on_loopback_with_host_networking_and_is_removed(
    tmp_path: Path, engine: docker.DockerClient, trained: tuple[TrainingJob, TrainingOutcome, list[str]],
) -> None:
    job, outcome, _ = trained
    assert outcome.succeeded, outcome.failure
    log_path = tmp_path / "serve.log"
    server = DockerRuntime().start_server(_image(SERVE_REF), job.model_dir, log_path)
    try:
        server.wait_healthy(60)
        with urllib.request.urlopen(f"{server.endpoint}/ping", timeout=5) as response:
            assert response.status == 200
        png = io.BytesIO()
        Image.fromarray((load_digits(n_class=3).images[0] * 16).astype(np.uint8), "L").save(png, format="PNG")
        reply = _post(server.endpoint, {"instances": [{"id": "a", "image": base64.b64encode(png.getvalue()).decode()}]})
        assert set(reply["predictions"][0]["scores"]) == set(LABELS)
        container = engine.containers.get(server.name)
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.labels[ENDPOINT_LABEL] == server.endpoint
        external = _external_ipv4()
        if external is not None:
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((external, server.port)) != 0, "the server listens beyond 127.0.0.1"
    finally:
        server.stop()
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(server.name)
    assert "/invocations" in log_path.read_text(), "the container's log was not kept"


def test_inference_container_that_exits_fails_with_its_log(tmp_path: Path, engine: docker.DockerClient) -> None:
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    server = DockerRuntime().start_server(_image(SERVE_REF), empty_model, tmp_path / "serve.log")
    with pytest.raises(StepFailed, match="exited with code"):
        server.wait_healthy(60)


DOCKER_TRAIN_URI = "000000000000.dkr.ecr.us-east-1.amazonaws.com/pml-examples/sklearn-image-docker:train"
DOCKER_SERVE_URI = "000000000000.dkr.ecr.us-east-1.amazonaws.com/pml-examples/sklearn-image-docker:serve"


def test_a_run_trains_evaluates_and_deploys_with_docker_images(
    stack: Any, engine: docker.DockerClient, tmp_path: Path,
) -> None:
    from sqlalchemy import select

    from pml.demo import digits_config
    from pml.demo_data import classification_example_id, write_demo_fhir
    from pml.images import add_docker_image
    from pml.runtimes.docker import check_image, stop_server_at
    from pml.store.tables import Deployment, Trial
    from tests.test_flow import finish

    with stack.app.session() as session:  # URIs of their own: the other tests use the folder images
        add_docker_image(session, DOCKER_TRAIN_URI, TRAIN_REF, check=check_image)
        add_docker_image(session, DOCKER_SERVE_URI, SERVE_REF, check=check_image)
    digits = write_demo_fhir(tmp_path / "fhir")
    client = stack.new_account(tmp_path / "fhir")
    config = digits_config("imgClf", train_image=DOCKER_TRAIN_URI, serve_image=DOCKER_SERVE_URI, max_trials=2)
    config["trainingApproach"]["searchSpace"][1].update(min=3, max=5)  # epochs: small and quick
    model = client.create_model(config)
    run = finish(stack, client, client.create_run(model.id).id)
    assert run.challenger_metrics["accuracy"] > 0.7, dict(run.challenger_metrics)
    endpoints: list[str] = []
    try:
        client.approve(run.id, description="docker images", user="tester")
        wait_for(lambda: client.get_run(run.id).deploy_status == "DEPLOYED", 120, "the docker deployment")
        with stack.app.session() as session:
            endpoints = [d.endpoint for d in session.scalars(select(Deployment).where(Deployment.model_id == model.id))]
            trial = session.get(Trial, run.challenger_trial_id)
            assert trial is not None
            trial_folder = Path(trial.folder)
        serving = engine.containers.list(filters={"label": f"{ENDPOINT_LABEL}={endpoints[0]}"})
        assert serving and serving[0].attrs["HostConfig"]["NetworkMode"] == "host", "not served by a container"
        digit = digits[-1]
        prediction = client.predict(model.id, example_id=classification_example_id(digit))
        assert prediction.predictions and prediction.predictions[0].value
        # The model came out of the training image: its scikit-learn, not pml's own.
        in_image = engine.containers.run(TRAIN_REF, ["python3", "-c", "import sklearn; print(sklearn.__version__)"],
                                         network_mode="none", remove=True).decode().strip()
        meta = json.loads((trial_folder / "model" / "model.json").read_text())
        assert meta["sklearn_version"] == in_image
    finally:
        for endpoint in endpoints:
            stop_server_at(endpoint)
