"""notify queue: POST one webhook delivery; a failure schedules the next attempt with backoff."""

import dramatiq

from pml.app import current_app
from pml.webhooks import deliver


@dramatiq.actor(actor_name="notify", queue_name="notify", max_retries=3, time_limit=300_000)
def notify(account_id: str, delivery_id: str) -> None:
    app = current_app()
    wait_s = deliver(app.session, app.settings, account_id, delivery_id)
    if wait_s is not None:
        app.enqueue("notify", account_id, delivery_id, delay_s=wait_s)
