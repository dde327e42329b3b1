"""Event latency (commit → a WatchRun / WatchEvents client has it) and gateway throughput.

Runs the gateway as its own process (``pml serve --no-workers``) on PostgreSQL and Redis, as
deployed; this process publishes events the way actors do (one transaction each) and follows
them over loopback gRPC. See bench/README.md for the numbers and how to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
from sqlalchemy import create_engine, text

from pml import events
from pml.app import App
from pml.client import PmlClient
from pml.demo import digits_config
from pml.settings import Settings
from pml.v1 import pml_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def follow(stream: grpc.Future, received: dict[int, float]) -> None:
    try:
        for item in stream:
            received[item.id] = time.time()
    except grpc.RpcError:
        pass  # cancelled at the end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="pause between two published events")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8], help="GetRun client threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--postgres", default=os.environ.get("PML_TEST_POSTGRES_URL",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis", default=os.environ.get("PML_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()

    name = f"pml_bench_{uuid.uuid4().hex[:8]}"
    admin_engine = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    home = Path(tempfile.mkdtemp(prefix="pml-bench-"))
    admin_key = secrets.token_urlsafe(16)
    settings = Settings(home=home, database_url=args.postgres.rsplit("/", 1)[0] + f"/{name}", redis_url=args.redis,
                        redis_namespace=f"pml-bench-{uuid.uuid4().hex[:8]}", admin_key=admin_key)
    app = App(settings)  # migrates before the gateway starts
    port = free_port()
    env = {**os.environ, "PML_HOME": str(home), "PML_DATABASE_URL": settings.sqlalchemy_url,
           "PML_REDIS_URL": args.redis, "PML_REDIS_NAMESPACE": settings.redis_namespace, "PML_ADMIN_KEY": admin_key}
    gateway = subprocess.Popen([sys.executable, "-m", "pml.cli", "serve", "--grpc-port", str(port), "--no-workers"],
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = f"127.0.0.1:{port}"
        admin = PmlClient(target, admin_key=admin_key)
        for _ in range(100):
            try:
                admin.create_account("bench", {"type": "folder", "path": str(home)})
                break
            except grpc.RpcError:
                time.sleep(0.2)
        client = PmlClient(target, account="bench", api_key=admin.create_api_key("bench"))
        model = client.create_model(digits_config("imgClf"))
        run_id = client.create_run(model.id).id  # no workers: it stays PENDING, a target for WatchRun

        by_run: dict[int, float] = {}
        by_filter: dict[int, float] = {}
        run_stream = client.events.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=client.metadata)
        filter_stream = client.events.WatchEvents(
            pb.WatchEventsRequest(filter=pb.EventFilter(types=["trial.metric"], model_id=model.id)),
            metadata=client.metadata)
        readers = [threading.Thread(target=follow, args=(s, r), daemon=True)
                   for s, r in ((run_stream, by_run), (filter_stream, by_filter))]
        for reader in readers:
            reader.start()
        time.sleep(1.0)  # both streams are past their replay

        committed: dict[int, float] = {}
        for i in range(args.events):
            with app.session() as session:
                row = events.publish(session, "bench", "trial.metric", run_id=run_id, model_id=model.id,
                                     data={"step": i})
                started = time.time()  # the COMMIT starts when the block ends
            committed[row.id] = started
            time.sleep(args.gap_ms / 1000)
        deadline = time.time() + 30
        while time.time() < deadline and not (set(committed) <= set(by_run) and set(committed) <= set(by_filter)):
            time.sleep(0.05)
        run_stream.cancel()
        filter_stream.cancel()

        result: dict[str, object] = {"events": args.events}
        for label, received in (("WatchRun", by_run), ("WatchEvents", by_filter)):
            missing = set(committed) - set(received)
            latencies = [(received[i] - committed[i]) * 1000 for i in committed if i in received]
            result[label] = {
                "missing": len(missing), "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2), "max_ms": round(max(latencies), 2),
            }

        throughput = {}
        for threads in args.threads:
            clients = [PmlClient(target, account="bench", api_key=client.api_key) for _ in range(threads)]
            counts = [0] * threads
            stop = time.time() + args.seconds

            def call(n: int) -> None:
                while time.time() < stop:
                    clients[n].get_run(run_id)
                    counts[n] += 1

            workers = [threading.Thread(target=call, args=(n,)) for n in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            throughput[f"{threads}_threads"] = round(sum(counts) / args.seconds)
            for c in clients:
                c.close()
        result["GetRun_calls_per_s"] = throughput
        print(json.dumps(result, indent=2))
    finally:
        gateway.terminate()
        gateway.wait(10)
        app.close()
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
