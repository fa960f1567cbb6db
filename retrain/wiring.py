"""Composition root: settings in, a Retrainer with real adapters out. Built on first use."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from retrain.arm import NewWebService, StaticToken, TokenCredential
from retrain.bes import BatchJobs, BesClient
from retrain.clock import Clock, SystemClock
from retrain.deploy import ClassicEndpoint, DeployTarget
from retrain.http import make_session, worst_call
from retrain.ledger import Ledger
from retrain.notify import Webhook
from retrain.pipeline import Places, Retrainer, Timing
from retrain.settings import ClassicTarget, ModelSpec, Settings, get_settings, read_secret
from retrain.storage import (
    BlobData,
    BlobDocumentStore,
    DataStore,
    DocumentStore,
    Outbox,
    QueueOutbox,
)

log = logging.getLogger(__name__)

P = TypeVar("P")


def _as_is(port: P) -> P:
    return port


@dataclass(frozen=True)
class PortWrappers:
    """How each port is wrapped as it is built, one typed hook per port; unchanged by default.
    Fault injection (localdev/chaosworker.py) wraps ports to crash right after a side effect."""

    store: Callable[[DocumentStore], DocumentStore] = _as_is
    data: Callable[[DataStore], DataStore] = _as_is
    outbox: Callable[[Outbox], Outbox] = _as_is
    jobs: Callable[[BatchJobs], BatchJobs] = _as_is
    target: Callable[[DeployTarget], DeployTarget] = _as_is


def build(
    settings: Settings, *, decorate: PortWrappers | None = None, clock: Clock | None = None
) -> Retrainer:
    """Assemble the pipeline from settings; nothing here talks to the network yet."""
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

    decorate = decorate or PortWrappers()
    connection = settings.storage_connection.get_secret_value()
    blobs = BlobServiceClient.from_connection_string(connection)
    queues = QueueServiceClient.from_connection_string(connection)
    session = make_session()
    timeout = (settings.http_connect_timeout, settings.http_read_timeout)

    def jobs_for(spec: ModelSpec) -> BatchJobs:
        key = read_secret(spec.bes.api_key_setting, purpose=f"BES API key of model {spec.name}")
        jobs = BesClient(
            str(spec.bes.jobs_url),
            key.get_secret_value(),
            session=session,
            timeout=timeout,
            key_setting=spec.bes.api_key_setting,
        )
        return decorate.jobs(jobs)

    def target_for(spec: ModelSpec) -> DeployTarget:
        return decorate.target(_target_for(spec))

    def _target_for(spec: ModelSpec) -> DeployTarget:
        target = spec.target
        if isinstance(target, ClassicTarget):
            key = read_secret(
                target.api_key_setting, purpose=f"endpoint API key of model {spec.name}"
            )
            return ClassicEndpoint(
                str(target.endpoint_url),
                key.get_secret_value(),
                target.resource_name,
                session=session,
                timeout=timeout,
            )
        return NewWebService(
            arm_endpoint=str(target.arm_endpoint),
            subscription_id=target.subscription_id,
            resource_group=target.resource_group,
            name=target.web_service,
            asset_name=target.asset_name,
            api_version=target.api_version,
            credential=arm_credential(target.token_setting, spec.name),
            session=session,
            timeout=timeout,
        )

    return Retrainer(
        models=settings.models,
        ledger=Ledger(decorate.store(BlobDocumentStore(blobs, settings.state_container))),
        data=decorate.data(BlobData(blobs)),
        outbox=decorate.outbox(QueueOutbox(queues)),
        jobs_for=jobs_for,
        target_for=target_for,
        places=Places(
            data_container=settings.data_container,
            artifacts_container=settings.artifacts_container,
            quarantine_container=settings.quarantine_container,
            jobs_queue=settings.jobs_queue,
            evaluations_queue=settings.evaluations_queue,
            events_queue=settings.events_queue,
        ),
        timing=Timing(
            settings.poll_first_delay,
            settings.poll_max_delay,
            settings.sweep_stall,
            call_bound=timedelta(seconds=worst_call(*timeout)),
        ),
        clock=clock or SystemClock(),
    )


@functools.cache
def _default_credential() -> TokenCredential:
    # Imported on first use: azure-identity costs ~0.7 s to import.
    from azure.identity import DefaultAzureCredential

    credential: TokenCredential = DefaultAzureCredential()
    return credential


def arm_credential(token_setting: str | None, model: str) -> TokenCredential:
    """DefaultAzureCredential (managed identity in Azure), or a fixed token for emulators."""
    if token_setting is None:
        return _default_credential()
    token = read_secret(token_setting, purpose=f"ARM bearer token of model {model}")
    return StaticToken(token.get_secret_value())


@functools.cache
def retrainer() -> Retrainer:
    """The app's Retrainer, built once per worker process."""
    return build(get_settings())


@functools.cache
def webhook() -> Webhook | None:
    """The configured webhook, or None."""
    settings = get_settings()
    if settings.webhook_url is None:
        return None
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if secret is None:
        log.warning(
            "RETRAIN_WEBHOOK_SECRET is not set: webhook posts are unsigned, so a receiver "
            "cannot tell them from forged ones"
        )
    return Webhook(
        str(settings.webhook_url),
        secret,
        session=make_session(),
        timeout=(settings.http_connect_timeout, settings.http_read_timeout),
    )
