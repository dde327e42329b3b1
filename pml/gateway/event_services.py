"""Event streams (replay the history after an event id, then follow live) and webhooks.

A stream reads SQL only: ``id > last`` in id order, which is commit order (see
``pml.events``), so replay and live are one loop with no gap and no duplicate. Between
reads it waits on the process's event hub, woken by the Redis stream (or in process when
embedded) and re-reading at least every ``event_recheck_s`` whatever happens.
"""

from __future__ import annotations

from typing import Iterator

import grpc
from google.protobuf import empty_pb2

from pml import commands, models, runs, webhooks
from pml.app import App
from pml.errors import InvalidArgument
from pml.events import Announcement, EventFilter, check_types, list_events
from pml.gateway import convert
from pml.gateway.auth import caller
from pml.gateway.errors import grpc_errors, grpc_stream_errors
from pml.gateway import paging
from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

# Events read from SQL at a time; a longer history is replayed in several reads.
READ_BATCH = 500


class EventService(rpc.EventServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_stream_errors
    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        who = caller(self.app, context)
        with self.app.session() as session:
            runs.get_run(session, who.account_id, request.run_id)
        yield from self._follow(who.account_id, EventFilter(run_id=request.run_id), request.after_event_id, context)

    @grpc_stream_errors
    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        who = caller(self.app, context)
        wanted = request.filter
        violations = check_types("filter.types", list(wanted.types))
        if violations:
            raise InvalidArgument(violations)
        with self.app.session() as session:
            if wanted.run_id:
                runs.get_run(session, who.account_id, wanted.run_id)
            if wanted.model_id:
                models.get_model(session, who.account_id, wanted.model_id)
        where = EventFilter(types=frozenset(wanted.types), run_id=wanted.run_id, model_id=wanted.model_id)
        yield from self._follow(who.account_id, where, request.after_event_id, context)

    def _follow(self, account_id: str, where: EventFilter, after: int,
                context: grpc.ServicerContext) -> Iterator[pb.Event]:
        if after < 0:
            raise InvalidArgument([("after_event_id", "must be 0 (from the start) or an event id")])
        hub = self.app.eventbus.follow()
        context.add_callback(hub.kick)  # a client that goes away stops its wait at once
        recheck_s = self.app.settings.event_recheck_s

        def wanted(item: Announcement) -> bool:
            return item.id > after and where.matches(account_id, item)

        def gone() -> bool:
            return not context.is_active()

        while not gone():
            mark = hub.mark()  # before the read: anything committed after it wakes the wait below
            with self.app.session() as session:
                batch = [convert.event(row) for row in
                         list_events(session, account_id, after_id=after, where=where, limit=READ_BATCH)]
            for message in batch:
                yield message
                after = message.id
            if len(batch) < READ_BATCH:
                hub.wait(mark, wanted, recheck_s, stop=gone)


class WebhookService(rpc.WebhookServiceServicer):
    def __init__(self, app: App):
        self.app = app

    @grpc_errors
    def CreateSubscription(self, request: pb.CreateSubscriptionRequest,
                           context: grpc.ServicerContext) -> pb.Subscription:
        who = caller(self.app, context)
        row = commands.create_subscription(self.app, who, request.url, list(request.event_types))
        return convert.subscription(row, with_secret=True)

    @grpc_errors
    def GetSubscription(self, request: pb.GetSubscriptionRequest, context: grpc.ServicerContext) -> pb.Subscription:
        who = caller(self.app, context)
        with self.app.session() as session:
            return convert.subscription(webhooks.get_subscription(session, who.account_id, request.subscription_id))

    @grpc_errors
    def ListSubscriptions(self, request: pb.ListSubscriptionsRequest,
                          context: grpc.ServicerContext) -> pb.ListSubscriptionsResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.page(webhooks.list_subscriptions(session, who.account_id), request.page_size,
                                request.page_token)
            return pb.ListSubscriptionsResponse(subscriptions=[convert.subscription(r) for r in rows],
                                                next_page_token=token)

    @grpc_errors
    def DeleteSubscription(self, request: pb.DeleteSubscriptionRequest,
                           context: grpc.ServicerContext) -> empty_pb2.Empty:
        who = caller(self.app, context)
        commands.delete_subscription(self.app, who, request.subscription_id)
        return empty_pb2.Empty()

    @grpc_errors
    def ListDeliveries(self, request: pb.ListDeliveriesRequest,
                       context: grpc.ServicerContext) -> pb.ListDeliveriesResponse:
        who = caller(self.app, context)
        with self.app.session() as session:
            rows, token = paging.newest_first_page(
                webhooks.list_deliveries(session, who.account_id, request.subscription_id, request.state),
                lambda delivery: delivery.event_id, request.page_size, request.page_token,
            )
            return pb.ListDeliveriesResponse(deliveries=[convert.delivery(r) for r in rows], next_page_token=token)
