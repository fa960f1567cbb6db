"""Review findings on the typed records, backend-neutral ports and identity storage: each test
failed on main at 881afac. Documents this release writes must stay readable by the previous
release (an older instance during a rolling upgrade, or after the release is rolled back)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from localdev.sample import housing_csv
from retrain.connection import PREFIX
from retrain.errors import ConfigError
from retrain.ledger import model_key
from retrain.settings import get_settings
from tests.harness import World, raw_spec


def trained() -> World:
    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    assert w.run()["state"] == "trained"
    return w


def old_release_blob(value: object) -> tuple[str, str]:
    """How the previous release (488157d) reads a stored model or evaluation location:
    `container, _, blob = path.partition("/")` (pipeline/gate.py:93, slot.py:134-137)."""
    container, _, blob = value.partition("/")  # type: ignore[attr-defined]
    return container, blob


def test_a_run_this_release_submits_can_be_gated_by_the_previous_release() -> None:
    w = trained()
    run = w.run()
    container, blob = old_release_blob(run["outputs"]["evaluation"])
    assert (container, blob) == ("artifacts", f"housing/{run['run_id']}/evaluation.csv")


def test_a_run_this_release_gates_can_be_promoted_by_the_previous_release() -> None:
    w = trained()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    assert w.deliver() == ["promoted"]
    # The gate's own write (trained -> promoting) stored this, before any deploy.
    container, blob = old_release_blob(w.run()["outputs"]["model"])
    assert container == "artifacts"
    assert blob.endswith("model.ilearner")


def test_a_champion_this_release_crowns_is_readable_by_the_previous_release() -> None:
    w = trained()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    assert w.deliver() == ["promoted"]
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    container, blob = old_release_blob(state["champion"]["model"])
    assert container == "artifacts"
    assert blob.endswith("model.ilearner")


@pytest.fixture
def identity_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name == PREFIX or name.startswith(f"{PREFIX}__"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(f"{PREFIX}__accountName", "acct")
    monkeypatch.setenv("RETRAIN_DATA_CONTAINER", "data")
    monkeypatch.setenv("RETRAIN_JOBS_QUEUE", "jobs")
    monkeypatch.setenv("RETRAIN_EVALUATIONS_QUEUE", "evals")
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_identity_storage_refuses_a_job_deadline_no_delegation_key_can_cover(
    identity_settings: pytest.MonkeyPatch,
) -> None:
    identity_settings.setenv("RETRAIN_MODELS", json.dumps([raw_spec(job_deadline="P7D")]))
    with pytest.raises(ConfigError, match="job_deadline"):
        get_settings()


def test_a_permanent_error_that_is_not_a_remote_one_fails_the_promotion_with_its_reason() -> None:
    """E.g. a target refusing a model reference it cannot deploy: the run fails, naming why,
    instead of the message being retried until it is poison."""
    from retrain.errors import PermanentError

    w = trained()
    w.evaluation("Root Mean Squared Error\n2.5\n")

    def refuses(model: object) -> object:
        raise PermanentError("a trained model's blob must end in .ilearner")

    w.target.deploy = refuses  # type: ignore[method-assign,assignment]
    assert w.deliver() == ["failed"]
    assert "must end in .ilearner" in w.run()["error"]


def test_a_permanent_error_that_is_not_a_remote_one_fails_the_training_with_its_reason() -> None:
    from retrain.errors import PermanentError

    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    w.deliver()  # sealed

    def refuses(**kwargs: object) -> str:
        raise PermanentError("the job's input cannot be named")

    w.jobs.submit = refuses  # type: ignore[method-assign,assignment]
    assert w.deliver() == ["failed"]
    assert "cannot be named" in w.run()["error"]
