"""tune queue: Ray Tune trials → challenger, then evaluation."""

import dramatiq

from pml.app import current_app
from pml.tuning.tuner import tune_run


@dramatiq.actor(actor_name="tuner", queue_name="tune", max_retries=3, time_limit=86_400_000)
def tuner(account_id: str, run_id: str) -> None:
    app = current_app()
    if tune_run(app, account_id, run_id):
        app.enqueue("evaluate", account_id, run_id)
