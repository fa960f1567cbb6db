"""The trigger layer: the functions, bindings the host accepts, nothing heavy at import, and
one delegating call per trigger."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

import function_app
from localdev import v2stack


@pytest.fixture(scope="module")
def functions() -> dict[str, Any]:
    import importlib

    app = importlib.reload(function_app).app
    return {f.get_function_name(): f for f in app.get_functions()}


def test_functions_and_their_triggers(functions: dict[str, Any]) -> None:
    assert sorted(functions) == [
        "evaluate",
        "evaluate_poison",
        "ingest",
        "job_events",
        "notify",
        "sweep",
        "train",
        "train_poison",
    ]
    assert functions["train_poison"].get_trigger().queue_name == "%RETRAIN_JOBS_QUEUE%-poison"
    assert functions["sweep"].get_trigger().schedule == "%RETRAIN_SWEEP_SCHEDULE%"
    assert functions["ingest"].get_trigger().path == "%RETRAIN_DATA_CONTAINER%/{name}"
    assert functions["train"].get_trigger().queue_name == "%RETRAIN_JOBS_QUEUE%"
    assert functions["evaluate"].get_trigger().queue_name == "%RETRAIN_EVALUATIONS_QUEUE%"
    assert functions["job_events"].get_trigger().get_binding_name() == "eventGridTrigger"


def test_every_storage_trigger_connects_through_the_settings_the_app_reads(
    functions: dict[str, Any],
) -> None:
    """The host resolves a trigger's `connection` as a connection string or as the
    `<connection>__*` identity settings; the app's own clients read the same prefix, so one set
    of settings (key or identity) serves both."""
    from retrain.connection import PREFIX

    connections = {
        fn.get_function_name(): getattr(fn.get_trigger(), "connection", None)
        for fn in functions.values()
    }
    with_storage = {name: c for name, c in connections.items() if c is not None}
    assert set(with_storage) >= {"ingest", "train", "evaluate", "notify"}
    assert set(with_storage.values()) == {PREFIX}


def test_parameter_names_match_binding_names(functions: dict[str, Any]) -> None:
    """The worker rejects a mismatch silently and the host then shows zero functions."""
    for fn in functions.values():
        params = set(inspect.signature(fn.get_user_function()).parameters)
        bindings = {b.name for b in fn.get_bindings()}
        assert params == bindings, fn.get_function_name()


def test_blob_trigger_asks_the_host_for_a_reference_not_the_content(
    functions: dict[str, Any],
) -> None:
    """The metadata the worker sends flags the trigger SupportsDeferredBinding, so the host sends
    model binding data (the blob's address) instead of the blob's bytes."""
    from azurefunctions.extensions.base import get_binding_registry

    from retrain.binding import BlobAddress

    fn = functions["ingest"]
    annotation = inspect.signature(fn.get_user_function()).parameters["blob"].annotation
    assert annotation is BlobAddress
    registry = get_binding_registry()
    raw, _ = registry.get_raw_bindings(fn, {"blob": SimpleNamespace(pytype=annotation)})
    (trigger,) = [json.loads(b) for b in raw]
    assert trigger["type"] == "blobTrigger"
    assert trigger["properties"] == {"SupportsDeferredBinding": True}
    assert registry.get("blobTrigger").check_input_type_annotation(annotation)


def _fresh_python(code: str, **env: str) -> str:
    """Run `code` in a new interpreter beside function_app.py, with no app settings but `env`;
    returns what it printed."""
    root = str(function_app.__file__).rsplit("/", 1)[0]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={"PATH": "", **env},
    )
    return out.stdout


HEAVY = ("azure.storage", "azure.identity", "azure.core", "pydantic", "requests", "urllib3")


V2_CONFIGURED = {
    "RETRAIN_MODELS": json.dumps([v2stack.model_spec("http://127.0.0.1:9")]),
    "RETRAIN_ARM_TOKEN": v2stack.ARM_TOKEN,
}


@pytest.mark.parametrize("env", [{}, V2_CONFIGURED], ids=["no settings", "v2 model configured"])
def test_import_loads_no_domain_code_no_settings_and_no_sdk(env: dict[str, str]) -> None:
    """Settings and clients are built on first use: an import error would hide every function,
    and every module loaded here is paid on each cold start. An Azure ML v2 model configured
    changes nothing: its adapters (retrain.azureml, requests, azure.identity) load when the
    first trigger builds them."""
    code = (
        "import sys, function_app\n"
        "print(sorted(m for m in sys.modules if 'retrain' in m))\n"
        f"print(sorted({{m.split('.')[0] + '.' + m.split('.')[1] if '.' in m else m "
        f"for m in sys.modules if m.startswith({HEAVY!r})}}))\n"
    )
    domain, heavy = _fresh_python(code, **env).strip().splitlines()
    assert domain == "['retrain', 'retrain.binding']"  # the blob trigger's converter only
    assert heavy == "[]"


def test_event_grid_ingest_needs_no_binding_extension() -> None:
    """RETRAIN_INGEST_TRIGGER=eventgrid: an Event Grid trigger, and a lighter cold start."""
    code = (
        "import sys, inspect, function_app\n"
        "fns = function_app.app.get_functions()\n"
        "(fn,) = [f for f in fns if f.get_function_name() == 'ingest']\n"
        "params = set(inspect.signature(fn.get_user_function()).parameters)\n"
        "print(fn.get_trigger().get_binding_name(), params == {b.name for b in fn.get_bindings()},"
        " any(m.startswith('azurefunctions.extensions') for m in sys.modules))\n"
    )
    out = _fresh_python(code, RETRAIN_INGEST_TRIGGER="eventgrid")
    assert out.split() == ["eventGridTrigger", "True", "False"]


class _Recorder:
    """Stands in for the Retrainer: records each call the triggers make."""

    def __init__(self) -> None:
        from retrain.pipeline import Places

        self.places = Places("data", "art", "quarantine", "jobs-q", "evals-q", "events-q")
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    from retrain import wiring

    fake = _Recorder()
    monkeypatch.setattr(wiring, "retrainer", lambda: fake)
    return fake


def _queue_message(body: str, *, message_id: str = "m-1", dequeue_count: int = 2) -> Any:
    from azure.functions.queue import QueueMessage

    return QueueMessage(id=message_id, body=body.encode(), dequeue_count=dequeue_count)


class TestTriggersDelegate:
    """Each trigger parses its input and makes one call; what the call does is tested in unit/."""

    def test_a_jobs_message_goes_to_the_step_its_kind_names(
        self, functions: dict[str, Any], recorder: _Recorder
    ) -> None:
        from retrain.messages import CheckBatch, TrackRun
        from retrain.pipeline import Delivery

        train = functions["train"].get_user_function()
        check = CheckBatch(model="housing", batch_id="b-1", arrivals=1)
        track = TrackRun(model="housing", run_id="r-1", poll=3)
        train(_queue_message(check.model_dump_json()))
        train(_queue_message(track.model_dump_json(), message_id="m-2", dequeue_count=4))
        assert recorder.calls == [
            ("on_check_batch", (check,), {}),
            ("on_track_run", (track,), {"delivery": Delivery("m-2", 4)}),
        ]

    def test_an_evaluations_message_carries_its_delivery(
        self, functions: dict[str, Any], recorder: _Recorder
    ) -> None:
        from retrain.messages import EvaluateRun
        from retrain.pipeline import Delivery

        message = EvaluateRun(model="housing", run_id="r-1")
        functions["evaluate"].get_user_function()(_queue_message(message.model_dump_json()))
        assert recorder.calls == [("on_evaluate", (message,), {"delivery": Delivery("m-1", 2)})]

    def test_poison_handlers_name_their_queue_as_the_wiring_does(
        self, functions: dict[str, Any], recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Not from the environment: the queue name keys the poison record and picks its parser."""
        monkeypatch.delenv("RETRAIN_JOBS_QUEUE", raising=False)
        monkeypatch.delenv("RETRAIN_EVALUATIONS_QUEUE", raising=False)
        functions["train_poison"].get_user_function()(_queue_message("a"))
        functions["evaluate_poison"].get_user_function()(_queue_message("b"))
        assert recorder.calls == [
            ("on_poison", ("jobs-q", b"a"), {}),
            ("on_poison", ("evals-q", b"b"), {}),
        ]

    def test_the_blob_trigger_hands_on_the_address(
        self, functions: dict[str, Any], recorder: _Recorder
    ) -> None:
        from retrain.binding import BlobAddress

        blob = BlobAddress("data", "housing/a.csv", "AzureWebJobsStorage")
        functions["ingest"].get_user_function()(blob)
        functions["sweep"].get_user_function()(None)
        assert recorder.calls == [("on_blob", ("data", "housing/a.csv"), {}), ("sweep", (), {})]


class TestBlobEvents:
    """The Event Grid path, called directly (the app indexes it only when configured)."""

    @staticmethod
    def _event(url: str, *, api: str = "PutBlob") -> tuple[str, str, dict[str, Any]]:
        return ("e-1", "Microsoft.Storage.BlobCreated", {"api": api, "url": url})

    def test_a_blob_in_the_wired_data_container_is_ingested(self, recorder: _Recorder) -> None:
        from retrain import triggers

        triggers.blob_event(*self._event("https://acct.blob.core.windows.net/data/housing/a.csv"))
        assert recorder.calls == [("on_blob", ("data", "housing/a.csv"), {})]

    def test_other_events_are_skipped(self, recorder: _Recorder) -> None:
        from retrain import triggers

        triggers.blob_event(*self._event("https://acct.blob.core.windows.net/other/a.csv"))
        triggers.blob_event(
            *self._event("https://acct.blob.core.windows.net/data/a.csv", api="PutBlock")
        )
        assert recorder.calls == []
