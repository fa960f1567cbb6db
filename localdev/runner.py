"""A local runner for the function app, for machines without Azure Functions Core Tools.

What it emulates, from the app's own metadata: the blob trigger (a container scan with
receipts on name + ETag, like the polling trigger), the queue triggers (base64 bodies,
`dequeue_count`, re-delivery after a failure, and `<queue>-poison` after `maxDequeueCount`
from host.json), and `%SETTING%` binding expressions resolved from the environment.
Timer triggers fire on demand (`fire`) or at a fixed interval, not on their CRON schedule.
What it does not: Event Grid delivery, concurrency limits, function timeouts, scale-out.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import azure.functions as func
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import (
    QueueClient,
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from retrain.connection import PREFIX, StorageConnection, StorageSettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger("runner")
ROOT = Path(__file__).resolve().parent.parent


def _resolve(expr: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise KeyError(f"binding expression %{name}% needs app setting {name}")
        return env[name]

    return re.sub(r"%([^%]+)%", sub, expr)


@dataclass
class _Trigger:
    name: str
    kind: str
    target: str
    arg: str
    call: Callable[..., Any]


@dataclass(frozen=True)
class _ModelBindingData:
    """The fields of the host's ModelBindingData message that a converter reads."""

    content: str
    version: str = "1.0"
    source: str = "AzureStorageBlobs"
    content_type: str = "application/json"


def _deferred_blob(t: _Trigger, content: str) -> Any:
    from azurefunctions.extensions.base import Datum, get_binding_registry

    registry = get_binding_registry()
    pytype = inspect.signature(t.call).parameters[t.arg].annotation
    if not registry.check_supported_type(pytype):
        raise ValueError(
            f"{t.name}: the local runner passes blob references only (an SDK-type parameter), "
            f"not content; {pytype!r} is not one"
        )
    converter = registry.get(t.kind)
    datum = Datum(_ModelBindingData(content), "model_binding_data")
    return converter.decode(datum, trigger_metadata={}, pytype=pytype)


class _GivenStorage(StorageSettings):
    """The app's storage settings, read from the mapping given alone (not the environment)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def storage_connection(env: Mapping[str, str]) -> StorageConnection:
    """The host's storage connection from app settings, as the app reads it: the connection
    string `AzureWebJobsStorage`, or the identity settings `AzureWebJobsStorage__*`."""
    given = {k: v for k, v in env.items() if k.split("__")[0] == PREFIX}
    try:
        return _GivenStorage.model_validate(given).storage
    except ValidationError as exc:  # the app's own text, without pydantic's wrapping
        problems = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError("; ".join(problems)) from None


class LocalRunner:
    """Drives the registered functions against Azurite, one polling round at a time."""

    def __init__(
        self,
        app: func.FunctionApp,
        *,
        env: Mapping[str, str] | None = None,
        host_json: Path = ROOT / "host.json",
        failure_visibility: timedelta | None = None,
        lease: timedelta = timedelta(minutes=2),
        duplicates: float = 0.0,
        shuffle: bool = False,
        rng: random.Random | None = None,
        functions: list[Any] | None = None,
        credential: TokenCredential | None = None,
    ) -> None:
        """`duplicates` is the chance that a delivery is made twice; `shuffle` reorders each
        batch of received messages (both as at-least-once delivery may). On an identity
        connection the runner, like the host, authenticates with the identity the settings name,
        or with `credential` when one is given."""
        self.duplicates = duplicates
        self.shuffle = shuffle
        self.rng = rng or random.Random(0)
        self.env = dict(os.environ if env is None else env)
        host = json.loads(host_json.read_text(encoding="utf-8"))
        queues = host.get("extensions", {}).get("queues", {})
        self.max_dequeue = int(queues.get("maxDequeueCount", 5))
        self.batch_size = int(queues.get("batchSize", 16))
        if failure_visibility is None:
            h, m, s = (int(x) for x in queues.get("visibilityTimeout", "00:00:00").split(":"))
            failure_visibility = timedelta(hours=h, minutes=m, seconds=s)
        self.failure_visibility = failure_visibility
        self.lease = lease
        self.triggers: list[_Trigger] = []
        connections = set()
        # An app can be indexed once; a second worker on the same app passes the first's list.
        self.functions = functions if functions is not None else app.get_functions()
        for fn in self.functions:
            trigger: Any = fn.get_trigger()  # binding metadata classes differ per trigger
            kind = trigger.get_binding_name()
            if kind not in ("timerTrigger", "eventGridTrigger"):
                connections.add(trigger.connection)
            if kind == "blobTrigger":
                target = _resolve(trigger.path, self.env).split("/", 1)[0]
            elif kind == "queueTrigger":
                target = _resolve(trigger.queue_name, self.env)
            elif kind == "timerTrigger":
                target = _resolve(trigger.schedule, self.env)
            elif kind == "eventGridTrigger":
                target = ""  # delivered on demand by deliver_event; Event Grid is not emulated
            else:
                raise ValueError(f"the local runner does not emulate {kind} triggers")
            self.triggers.append(
                _Trigger(
                    str(fn.get_function_name()), kind, target, trigger.name, fn.get_user_function()
                )
            )
        if connections != {"AzureWebJobsStorage"}:
            raise ValueError(f"the local runner supports AzureWebJobsStorage only: {connections}")
        self.blobs: BlobServiceClient
        self.queues: QueueServiceClient
        self.blobs, self.queues = storage_connection(self.env).clients(credential)
        self.receipts: set[tuple[str, str, str]] = set()
        self.invocations: list[tuple[str, str, bool]] = []
        for t in self.triggers:
            self._create(t)

    def _create(self, t: _Trigger) -> None:
        if t.kind in ("timerTrigger", "eventGridTrigger"):
            return
        try:
            if t.kind == "blobTrigger":
                self.blobs.create_container(t.target)
            else:
                self.queues.create_queue(t.target)
                self.queues.create_queue(f"{t.target}-poison")
        except ResourceExistsError:
            pass

    def _queue(self, name: str) -> QueueClient:
        return self.queues.get_queue_client(
            name,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )

    def deliver_blob(self, trigger: str, container: str, name: str) -> bool:
        """Invoke the blob function for one blob now (a delivery, duplicate or not).

        As the host does for a deferred (SDK-type) binding: model binding data naming the blob,
        decoded by the converter registered for `blobTrigger`, as the worker would.
        """
        t = next(t for t in self.triggers if t.name == trigger)
        content = json.dumps(
            {"Connection": "AzureWebJobsStorage", "ContainerName": container, "BlobName": name}
        )
        return self._invoke(t, name, {t.arg: _deferred_blob(t, content)})

    def _invoke(self, t: _Trigger, what: str, kwargs: dict[str, Any]) -> bool:
        try:
            t.call(**kwargs)
        except Exception:
            log.exception("function %s failed on %s", t.name, what)
            self.invocations.append((t.name, what, False))
            return False
        self.invocations.append((t.name, what, True))
        return True

    def deliver_event(self, trigger: str, event: func.EventGridEvent) -> bool:
        """Invoke an Event Grid triggered function with one event (what Event Grid would POST)."""
        t = next(t for t in self.triggers if t.name == trigger and t.kind == "eventGridTrigger")
        return self._invoke(t, f"event {event.id}", {t.arg: event})

    def fire(self, trigger: str) -> bool:
        """Invoke a timer-triggered function now (its CRON schedule is not emulated)."""
        t = next(t for t in self.triggers if t.name == trigger and t.kind == "timerTrigger")
        return self._invoke(t, "timer", {t.arg: _Timer()})

    def step(self) -> int:
        """One polling round over every blob and queue trigger; returns the invocations made."""
        count = 0
        for t in self.triggers:
            if t.kind == "blobTrigger":
                count += self._scan(t)
            elif t.kind == "queueTrigger":
                count += self._drain(t)
        return count

    def lose_blob_event(self, container: str, name: str) -> None:
        """Mark a blob as seen without invoking anything: its event is lost (for tests)."""
        for props in self.blobs.get_container_client(container).list_blobs(name_starts_with=name):
            if props.name == name:
                self.receipts.add((container, name, str(props.etag)))

    def _scan(self, t: _Trigger) -> int:
        count = 0
        container = self.blobs.get_container_client(t.target)
        try:
            listing = list(container.list_blobs())
        except ResourceNotFoundError:
            return 0
        for props in listing:
            receipt = (t.target, props.name, str(props.etag))
            if receipt in self.receipts:
                continue
            if self.deliver_blob(t.name, t.target, props.name):
                self.receipts.add(receipt)
            if self.rng.random() < self.duplicates:
                self.deliver_blob(t.name, t.target, props.name)
            count += 1
        return count

    def _drain(self, t: _Trigger) -> int:
        queue = self._queue(t.target)
        messages = list(
            queue.receive_messages(
                max_messages=self.batch_size, visibility_timeout=int(self.lease.total_seconds())
            )
        )
        if self.shuffle:
            self.rng.shuffle(messages)
        for msg in messages:
            body = msg.content
            message = QueueMessage(  # type: ignore[no-untyped-call]
                id=msg.id,
                body=body.encode("utf-8") if isinstance(body, str) else body,
                dequeue_count=msg.dequeue_count,
                pop_receipt=msg.pop_receipt,
            )
            if self.rng.random() < self.duplicates:
                self._invoke(t, f"duplicate of message {msg.id}", {t.arg: message})
            if self._invoke(t, f"message {msg.id}", {t.arg: message}):
                queue.delete_message(msg)
            elif (msg.dequeue_count or 0) >= self.max_dequeue:
                log.error(
                    "message %s moved to %s-poison after %d attempts",
                    msg.id,
                    t.target,
                    msg.dequeue_count,
                )
                self._queue(f"{t.target}-poison").send_message(body)
                queue.delete_message(msg)
            else:
                queue.update_message(
                    msg, visibility_timeout=int(self.failure_visibility.total_seconds())
                )
        return len(messages)

    def undelivered(self) -> int:
        """Blobs a blob trigger has not yet handled successfully (the host would retry them)."""
        count = 0
        for t in self.triggers:
            if t.kind != "blobTrigger":
                continue
            with contextlib.suppress(ResourceNotFoundError):
                for props in self.blobs.get_container_client(t.target).list_blobs():
                    count += (t.target, props.name, str(props.etag)) not in self.receipts
        return count

    def pending(self) -> int:
        """Messages still in the trigger queues, visible or not (delayed polls count)."""
        total = 0
        for t in self.triggers:
            if t.kind == "queueTrigger":
                props = self._queue(t.target).get_queue_properties()
                total += props.approximate_message_count or 0
        return total

    def run_until_idle(self, *, timeout: float = 60.0, interval: float = 0.1) -> None:
        """Poll like the host until no queue holds a message and no blob is new."""
        deadline = time.monotonic() + timeout
        while True:
            if self.step() == 0 and self.pending() == 0 and self.step() == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"still busy after {timeout} s ({self.pending()} messages)")
            time.sleep(interval)  # the host's own polling interval, not a wait for a result

    def run_forever(self, *, interval: float = 0.5, timers_every: float = 300.0) -> None:
        """Serve until interrupted; timer functions fire every `timers_every` seconds."""
        next_timers = time.monotonic() + timers_every
        while True:
            if time.monotonic() >= next_timers:
                for t in self.triggers:
                    if t.kind == "timerTrigger":
                        self.fire(t.name)
                next_timers = time.monotonic() + timers_every
            if self.step() == 0:
                time.sleep(interval)


class _Timer:
    """What a timer trigger passes: the host's TimerRequest, minus the schedule details."""

    past_due = False


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s %(message)s"


def log_handler(stream: TextIO) -> logging.Handler:
    """The runner's log lines: time, level name, logger, message."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def main() -> None:
    """Run the app locally against the storage its settings name (a connection string in
    AzureWebJobsStorage, or an identity connection through AzureWebJobsStorage__*)."""
    parser = argparse.ArgumentParser(description="Run the function app against Azurite.")
    parser.add_argument(
        "--settings",
        type=Path,
        default=ROOT / "local.settings.json",
        help="local.settings.json whose Values become app settings",
    )
    args = parser.parse_args()
    values = json.loads(args.settings.read_text(encoding="utf-8")).get("Values", {})
    os.environ.update({k: str(v) for k, v in values.items() if k not in os.environ})
    logging.basicConfig(level=logging.INFO, handlers=[log_handler(sys.stderr)])
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    from function_app import app

    LocalRunner(app).run_forever()


if __name__ == "__main__":
    main()
