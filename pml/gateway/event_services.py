"""Event streams: replay the history after an event id, then follow live."""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from pml import runs
from pml.app import App
from pml.events import list_events
from pml.gateway import convert
from pml.gateway.auth import caller
from pml.gateway.errors import grpc_stream_errors
from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

WATCH_POLL_S = 0.1


class EventService(rpc.EventServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_stream_errors
    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        who = caller(self.app, context)
        with self.app.session() as session:
            runs.get_run(session, who.account_id, request.run_id)
        after = request.after_event_id
        while context.is_active():
            with self.app.session() as session:
                batch = list_events(session, who.account_id, after_id=after, run_id=request.run_id)
            for row in batch:
                after = row.id
                yield convert.event(row)
            if not batch:
                time.sleep(WATCH_POLL_S)
