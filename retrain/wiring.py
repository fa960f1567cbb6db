"""Composition root: settings in, a Retrainer with real adapters out. Built on first use."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import requests

from retrain.arm import NewWebService, StaticToken
from retrain.azureml.spec import AzureMLSpec, OnlineEndpointSpec
from retrain.azureml.workspace import ArmClient
from retrain.backends.azureml import AzureMLTraining
from retrain.backends.bes import BesTraining
from retrain.bes import BatchJobs, BesClient
from retrain.blobdata import BlobData
from retrain.classic_spec import BesSpec, ClassicTarget, NewTarget
from retrain.clock import Clock, SystemClock
from retrain.deploy import ClassicEndpoint, DeployTarget, ModelReader, sas_reader
from retrain.errors import ConfigError
from retrain.http import TokenCredential, make_session, worst_call
from retrain.ledger import Ledger
from retrain.notify import Webhook
from retrain.pipeline import Context, Places, Retrainer, Timing
from retrain.ports import TrainingBackend
from retrain.settings import ModelSpec, Settings, get_settings, read_secret
from retrain.storage import (
    BlobDocumentStore,
    DataStore,
    DocumentStore,
    Outbox,
    QueueOutbox,
)
from retrain.targets.online_endpoint import OnlineEndpoint

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential as StorageCredential

    from retrain.storage_check import StorageCheck, StoragePlaces

log = logging.getLogger(__name__)
_T = TypeVar("_T")
P = TypeVar("P")


def _as_is(port: P) -> P:
    return port


@dataclass(frozen=True)
class PortWrappers:
    """How each port is wrapped as it is built, one typed hook per port; unchanged by default.
    Fault injection (localdev/chaosworker.py) wraps ports to crash right after a side effect.
    `jobs` wraps the BES service client inside the BES training adapter, `training` each
    model's training backend."""

    store: Callable[[DocumentStore], DocumentStore] = _as_is
    data: Callable[[DataStore], DataStore] = _as_is
    outbox: Callable[[Outbox], Outbox] = _as_is
    jobs: Callable[[BatchJobs], BatchJobs] = _as_is
    training: Callable[[TrainingBackend], TrainingBackend] = _as_is
    target: Callable[[DeployTarget], DeployTarget] = _as_is


@dataclass(frozen=True)
class Shared:
    """What the adapters of every model share: one HTTP session, its timeouts, the app's data
    store (it mints SAS tokens), a reader of model blobs for targets, and the fault hook."""

    session: requests.Session
    timeout: tuple[float, float]
    data: DataStore
    read: ModelReader
    decorate: PortWrappers


def _as(value: object, kind: type[_T]) -> _T:
    """`value`, checked to be the spec its adapter is for (the kind it was looked up by)."""
    if not isinstance(value, kind):
        raise ConfigError(f"the {kind.__name__} adapter was given a {type(value).__name__}")
    return value


def _bes(spec: ModelSpec, shared: Shared) -> TrainingBackend:
    bes = _as(spec.training, BesSpec)
    key = read_secret(bes.api_key_setting, purpose=f"BES API key of model {spec.name}")
    client = BesClient(
        str(bes.jobs_url),
        key.get_secret_value(),
        session=shared.session,
        timeout=shared.timeout,
        key_setting=bes.api_key_setting,
    )
    return BesTraining(shared.decorate.jobs(client), shared.data, bes)


def _classic(spec: ModelSpec, shared: Shared) -> DeployTarget:
    target = _as(spec.target, ClassicTarget)
    key = read_secret(target.api_key_setting, purpose=f"endpoint API key of model {spec.name}")
    return ClassicEndpoint(
        str(target.endpoint_url),
        key.get_secret_value(),
        target.resource_name,
        read=shared.read,
        session=shared.session,
        timeout=shared.timeout,
    )


def _new(spec: ModelSpec, shared: Shared) -> DeployTarget:
    target = _as(spec.target, NewTarget)
    return NewWebService(
        arm_endpoint=str(target.arm_endpoint),
        subscription_id=target.subscription_id,
        resource_group=target.resource_group,
        name=target.web_service,
        asset_name=target.asset_name,
        api_version=target.api_version,
        credential=arm_credential(target.token_setting, spec.name),
        read=shared.read,
        session=shared.session,
        timeout=shared.timeout,
    )


def _workspace(
    spec: ModelSpec, part: AzureMLSpec | OnlineEndpointSpec, shared: Shared
) -> ArmClient:
    return ArmClient(
        part.workspace_ref,
        credential=arm_credential(part.token_setting, spec.name),
        session=shared.session,
        timeout=shared.timeout,
    )


def _azureml(spec: ModelSpec, shared: Shared) -> TrainingBackend:
    training = _as(spec.training, AzureMLSpec)
    return AzureMLTraining(_workspace(spec, training, shared), training)


def _online_endpoint(spec: ModelSpec, shared: Shared) -> DeployTarget:
    target = _as(spec.target, OnlineEndpointSpec)
    return OnlineEndpoint(_workspace(spec, target, shared), target)


TRAINING: dict[str, Callable[[ModelSpec, Shared], TrainingBackend]] = {
    "bes": _bes,
    "azureml": _azureml,
}
"""The adapter of each `training.kind`: a new backend adds its kind here."""
TARGETS: dict[str, Callable[[ModelSpec, Shared], DeployTarget]] = {
    "classic": _classic,
    "new": _new,
    "online_endpoint": _online_endpoint,
}
"""The adapter of each `target.kind`: a new target adds its kind here."""


def build(
    settings: Settings,
    *,
    decorate: PortWrappers | None = None,
    clock: Clock | None = None,
    credential: StorageCredential | None = None,
) -> Retrainer:
    """Assemble the pipeline from settings; nothing here talks to the network yet.

    `credential` replaces the identity an identity-based storage connection names (tests)."""
    blobs, queues = settings.storage.clients(credential)
    clock = clock or SystemClock()
    decorate = decorate or PortWrappers()
    data = decorate.data(BlobData(blobs))
    shared = Shared(
        session=make_session(max_wait=settings.http_max_retry_wait),
        timeout=(settings.http_connect_timeout, settings.http_read_timeout),
        data=data,
        read=sas_reader(data, clock),
        decorate=decorate,
    )

    def training_for(spec: ModelSpec) -> TrainingBackend:
        return decorate.training(TRAINING[spec.training.kind](spec, shared))

    def target_for(spec: ModelSpec) -> DeployTarget:
        return decorate.target(TARGETS[spec.target.kind](spec, shared))

    context = Context(
        models=settings.models,
        ledger=Ledger(decorate.store(BlobDocumentStore(blobs, settings.state_container))),
        data=data,
        outbox=decorate.outbox(QueueOutbox(queues)),
        training_for=training_for,
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
            call_bound=timedelta(seconds=worst_call(*shared.timeout, settings.http_max_retry_wait)),
        ),
        clock=clock,
    )
    return Retrainer(context)


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


def check_target_setup(settings: Settings, name: str) -> list[str]:
    """The setup check of a model's target that goes beyond its preflight: for an online
    endpoint, that it exists and is Succeeded and that the deployment template's assets exist
    (retrain.azureml.checks). Other targets have none."""
    from retrain.azureml.checks import check_endpoint

    spec = settings.models[name]
    if not isinstance(spec.target, OnlineEndpointSpec):
        return []
    arm = ArmClient(
        spec.target.workspace_ref,
        credential=arm_credential(spec.target.token_setting, spec.name),
        session=make_session(max_wait=settings.http_max_retry_wait),
        timeout=(settings.http_connect_timeout, settings.http_read_timeout),
    )
    return check_endpoint(arm, spec.target)


def check_storage(settings: Settings) -> list[StorageCheck]:
    """Which storage mode is in use and whether the app can do its work there."""
    from retrain.storage_check import check

    blobs, queues = settings.storage.clients()
    return check(settings.storage, blobs, queues, storage_places(settings))


def storage_places(settings: Settings) -> StoragePlaces:
    """The containers and queues the app uses, as the storage check needs them."""
    from retrain.storage_check import StoragePlaces

    return StoragePlaces(
        data=settings.data_container,
        state=settings.state_container,
        artifacts=settings.artifacts_container,
        quarantine=settings.quarantine_container,
        queues=(settings.jobs_queue, settings.evaluations_queue, settings.events_queue),
    )


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
        session=make_session(max_wait=settings.http_max_retry_wait),
        timeout=(settings.http_connect_timeout, settings.http_read_timeout),
    )
