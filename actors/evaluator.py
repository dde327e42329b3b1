"""evaluate queue: challenger and champion scored on the same test split; the run completes."""

import dramatiq

from pml.app import current_app
from pml.evaluation.evaluate import evaluate_run


@dramatiq.actor(actor_name="evaluator", queue_name="evaluate", max_retries=3, time_limit=3_600_000)
def evaluator(account_id: str, run_id: str) -> None:
    evaluate_run(current_app(), account_id, run_id)
