"""deploy queue: start the approved champion's server, switch predictions to it when healthy."""

import dramatiq

from pml.app import current_app
from pml.serving.deploy import deploy_run


@dramatiq.actor(actor_name="deployer", queue_name="deploy", max_retries=3, time_limit=3_600_000)
def deployer(account_id: str, run_id: str) -> None:
    deploy_run(current_app(), account_id, run_id)
