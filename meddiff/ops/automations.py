"""Prefect automations of a meddiff server: notify a webhook when a pipeline or generate run fails.

``meddiff deploy`` calls :func:`apply_automations` after the deployments are applied. The webhook
URL comes from the environment (``MEDDIFF_ALERT_WEBHOOK_URL``) and is stored as a
``CustomWebhookNotificationBlock``; the automation fires on ``prefect.flow-run.Failed`` and
``prefect.flow-run.Crashed`` events of the watched deployments. Re-applying replaces both (idempotent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from meddiff.errors import MeddiffError

WEBHOOK_ENV = "MEDDIFF_ALERT_WEBHOOK_URL"  # where failure notifications are POSTed
BLOCK_NAME = "meddiff-failure-webhook"
AUTOMATION_NAME = "meddiff-failed-runs"


@dataclass(frozen=True)
class AlertConfig:
    webhook_url: str  # receives a JSON POST {"subject": ..., "body": ...} per failed/crashed run
    # the deployments watched: the pipeline and everything that generates
    deployments: tuple[str, ...] = ("pipeline/default", "pipeline/nightly", "generate-cohort/default",
                                    "generate-shard/default")
    allow_private_urls: bool = True  # the receiver may sit on a private/loopback address (self-hosted)

    def check(self) -> "AlertConfig":
        if not self.webhook_url.startswith(("http://", "https://")):
            raise MeddiffError(f"{WEBHOOK_ENV} must be an http(s) URL, got {self.webhook_url!r}")
        return self


def alert_config_from_env() -> AlertConfig | None:
    url = os.environ.get(WEBHOOK_ENV)
    return AlertConfig(url).check() if url else None


SUBJECT = "meddiff: {{ flow.name }}/{{ deployment.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = ("Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment {{ deployment.name }} ended "
        "{{ flow_run.state.name }}: {{ flow_run.state.message }}")


def apply_automations(cfg: AlertConfig, api_url: str) -> list[str]:
    """Create (or replace) the webhook block and the failure automation on the server at ``api_url``.

    Returns the deployments the automation watches (those that exist on the server)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = cfg.check()
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url=cfg.webhook_url, method="POST",
                                               json_data={"subject": "{{subject}}", "body": "{{body}}"},
                                               allow_private_urls=cfg.allow_private_urls)
        block_id = block.save(BLOCK_NAME, overwrite=True)
        watched, ids = [], []
        for name in cfg.deployments:
            try:
                ids.append(f"prefect.deployment.{client.read_deployment_by_name(name).id}")
                watched.append(name)
            except Exception:  # noqa: BLE001 - not applied on this server: nothing to watch
                continue
        if not ids:
            raise MeddiffError(f"none of {cfg.deployments} exists on {api_url}: run `meddiff deploy` first")
        for old in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(old.id)
        client.create_automation(AutomationCore(
            name=AUTOMATION_NAME, description="notify the webhook when a pipeline or generate run fails or crashes",
            trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                 match={"prefect.resource.id": "prefect.flow-run.*"},
                                 match_related={"prefect.resource.id": ids}, posture=Posture.Reactive,
                                 threshold=1, within=0),
            actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)]))
    return watched
