"""Automations as code: a failed pipeline run calls a webhook, and a GPU run stuck in Pending is cancelled.

Prefect's open-source server evaluates automations itself (its triggers service), so nothing has to watch the
runs. `ecamp notify --webhook URL` saves the URL as a Webhook block and (re)creates the automations below
through the client; running it again replaces them, so the command is the single place they are defined.
"""

from __future__ import annotations

from typing import Any

from prefect.automations import Automation, CallWebhook, CancelFlowRun, EventTrigger
from prefect.blocks.webhook import Webhook
from pydantic import SecretStr

WEBHOOK_BLOCK = "ecamp-failures"
FAILED = "ecamp-pipeline failed"
STUCK = "ecamp-gpu run stuck in Pending"

# What the webhook receives (a Jinja template Prefect renders): enough to act on without opening the UI.
PAYLOAD = """{
  "text": "ecamp: flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}",
  "flow_run": "{{ flow_run.name }}",
  "flow_run_id": "{{ flow_run.id }}",
  "state": "{{ flow_run.state.name }}",
  "message": {{ flow_run.state.message | tojson }},
  "parameters": {{ flow_run.parameters | tojson }}
}"""


def failure_automation(block_id: Any) -> Automation:
    """Any failed run of the `ecamp-pipeline` flow (every deployment of it: full, paper) calls the webhook."""
    return Automation(
        name=FAILED,
        description="Calls the ecamp-failures webhook with the run's name and one-line cause (ecamp notify).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": "ecamp-pipeline"},
            posture="Reactive",
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )


def stuck_automation(seconds: int) -> Automation:
    """A run on the ecamp-gpu pool that stays Pending (its worker took it, its process never started) for
    `seconds` is cancelled, so the pipeline waiting for it fails instead of hanging."""
    return Automation(
        name=STUCK,
        description=f"Cancels an ecamp-gpu flow run still Pending after {seconds} s (ecamp notify).",
        trigger=EventTrigger(
            after={"prefect.flow-run.Pending"},
            expect={"prefect.flow-run.*"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "work-pool", "prefect.resource.name": "ecamp-gpu"},
            for_each={"prefect.resource.id"},
            posture="Proactive",
            threshold=1,
            within=seconds,
        ),
        actions=[CancelFlowRun()],
    )


def install(webhook_url: str, cancel_pending_after: int | None) -> list[str]:
    """Save the webhook block and replace the automations; returns what was created."""
    block = Webhook(method="POST", url=SecretStr(webhook_url), allow_private_urls=True)
    block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
    wanted = [failure_automation(block_id)]
    if cancel_pending_after:
        wanted.append(stuck_automation(cancel_pending_after))
    for name in (FAILED, STUCK):
        delete_all(name)
    return [automation.create().name for automation in wanted]


def delete_all(name: str) -> None:
    """Every automation of that name (a re-run of `ecamp notify` replaces them, it never adds a copy)."""
    while True:
        try:
            Automation.read(name=name).delete()
        except ValueError:  # Automation.read: "not found"
            return
