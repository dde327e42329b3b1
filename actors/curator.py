"""curate queue: FHIR source → dataset snapshot, then tuning."""

import dramatiq

from pml.app import current_app
from pml.curation import curate_run


@dramatiq.actor(actor_name="curator", queue_name="curate", max_retries=3, time_limit=3_600_000)
def curator(account_id: str, run_id: str) -> None:
    app = current_app()
    if curate_run(app, account_id, run_id):
        app.enqueue("tune", account_id, run_id)
