"""Canary steps of an online endpoint promotion: traffic moves in the spec's shares, each held by
a delayed message, recorded on the run; any failure puts the saved traffic map back."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from localdev.sample import housing_csv
from retrain.azureml.spec import OnlineEndpointSpec
from retrain.deploy import SUCCEEDED, Progress
from retrain.errors import InputRejected, PermanentRemoteError, TransientRemoteError
from retrain.ledger import model_key
from retrain.messages import EvaluateRun
from retrain.pipeline import Delivery, Timing
from retrain.ports import ModelRef
from tests.harness import World, latest_run, train_next

HOLD = timedelta(minutes=5)
TARGET: dict[str, Any] = {
    "kind": "online_endpoint",
    "subscription_id": "sub",
    "resource_group": "rg",
    "workspace": "ws",
    "endpoint": "housing",
    "deployment_template": {"properties": {}},
    "smoke_request": {"input_data": {"data": [[1, 2]]}},
    "provisioning_timeout": "PT30M",
}


class SplitEndpoint:
    """A blue/green endpoint in memory with what canary steps need of a target: its traffic
    map, a PUT that reads the map first, a smoke request; faults on a numbered PUT."""

    def __init__(self) -> None:
        self.models: dict[str, ModelRef] = {}
        self.map: dict[str, int] = {}
        self.puts: list[dict[str, int]] = []
        self.attempts = 0
        self.refuse_put: int | None = None
        """The attempt (1-based) that the service refuses."""
        self.lose_answer_of_put: int | None = None
        """The PUT that lands, its answer lost (as if the instance died after sending it)."""
        self.stuck_put: int | None = None
        """The PUT that is accepted but never shows."""
        self.smoke_failures: list[str | None] = []
        self.smokes: list[str] = []

    def serves(self, model: ModelRef) -> bool:
        full = [name for name, share in self.map.items() if share == 100]
        return bool(full) and self.models.get(full[0]) == model

    def deploy(self, model: ModelRef) -> Progress:
        if self.serves(model):
            return SUCCEEDED
        for name, held in self.models.items():
            if held == model:
                return Progress("staged", operation=f"staged {name}")
        idle = next(name for name in ("blue", "green") if not self.map.get(name))
        self.models[idle] = model
        return Progress("staged", operation=f"staged {idle}")

    def progress(self, operation: str | None) -> Progress:
        return Progress("staged", operation=operation)

    def preflight(self) -> list[str]:
        return []

    def traffic(self) -> dict[str, int]:
        return dict(self.map)

    def shift(self, traffic: dict[str, int], operation: str | None) -> Progress:
        wanted = {name: share for name, share in traffic.items() if share}
        assert sum(wanted.values()) == 100, wanted  # the service refuses anything else
        if self.map == wanted:
            return SUCCEEDED
        if operation is not None:
            return Progress("pending", operation=operation)
        self.attempts += 1
        if self.attempts == self.refuse_put:
            raise PermanentRemoteError("PUT online endpoint housing: 400 traffic (injected)")
        self.puts.append(wanted)
        if len(self.puts) != self.stuck_put:
            self.map = wanted
        if len(self.puts) == self.lose_answer_of_put:
            lost = TransientRemoteError("PUT online endpoint housing: connection lost")
            lost.change_unanswered = True
            raise lost
        return Progress("pending", operation="settle")

    def smoke(self, deployment: str) -> str | None:
        self.smokes.append(deployment)
        return self.smoke_failures.pop(0) if self.smoke_failures else None


def canary_world(timeout: str = "PT30M", **canary: Any) -> tuple[World, SplitEndpoint]:
    """A champion on blue (all traffic), and a better second run trained, its evaluate
    message waiting; the target moves traffic in steps 10 and 50, each held HOLD."""
    plan = {"steps": [10, 50], "hold": "PT5M", **canary}
    w = World(target={**TARGET, "canary": plan, "provisioning_timeout": timeout})
    endpoint = SplitEndpoint()
    w.target = endpoint  # type: ignore[assignment]
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    assert drain(w)[-1] == "promoted"
    assert endpoint.puts == [{"blue": 100}]  # a first promotion has nothing to try against
    w.clock.advance(minutes=5)
    train_next(w, "housing/b.csv", seed=2, rmse=1.5)
    return w, endpoint


def drain(w: World) -> list[str]:
    """Deliver messages until none is left; every answer, in order."""
    answers: list[str] = []
    while w.outbox.sent:
        answers += w.deliver()
    return answers


def champion(w: World) -> str:
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    return str(state["champion"]["run_id"])


def step_message(w: World) -> EvaluateRun:
    ((_, msg, _),) = w.outbox.take()
    assert isinstance(msg, EvaluateRun)
    return msg


class TestSteps:
    def test_traffic_moves_through_each_step_held_by_a_delayed_message_then_all(self) -> None:
        w, endpoint = canary_world()
        assert w.deliver() == ["canary"]  # deploy, staged: step 1 PUT
        assert endpoint.puts[1:] == [{"green": 10, "blue": 90}]
        assert w.deliver() == ["canary"]  # settled: held
        ((_, _, delay),) = w.outbox.sent
        assert delay == HOLD
        canary = latest_run(w)["deployment"]["canary"]
        assert (canary["phase"], canary["step"], canary["saved"]) == ("holding", 0, {"blue": 100})
        assert drain(w)[-1] == "promoted"
        assert endpoint.puts[1:] == [
            {"green": 10, "blue": 90},
            {"green": 50, "blue": 50},
            {"green": 100},
        ]
        assert champion(w) == latest_run(w)["run_id"]

    def test_each_hold_ends_with_a_smoke_request_when_asked(self) -> None:
        w, endpoint = canary_world(smoke_each_step=True)
        assert drain(w)[-1] == "promoted"
        assert endpoint.smokes == ["green", "green"]

    def test_a_duplicate_or_early_copy_of_a_hold_message_neither_repeats_nor_skips_a_step(
        self,
    ) -> None:
        w, endpoint = canary_world()
        w.deliver()
        w.deliver()  # step 1 settled, held
        hold = step_message(w)
        early = EvaluateRun(model="housing", run_id=hold.run_id, poll=hold.poll)  # a re-drive
        w.clock.advance(minutes=1)
        assert w.retrainer.on_evaluate(early) == "canary"
        ((_, again, delay),) = w.outbox.take()
        assert delay == HOLD - timedelta(minutes=1)  # it holds for the rest, no move
        assert w.retrainer.on_evaluate(hold) == "duplicate"  # the copy the hold sent
        assert endpoint.puts[1:] == [{"green": 10, "blue": 90}]
        w.clock.advance(minutes=4)
        assert w.retrainer.on_evaluate(again) == "canary"
        assert w.retrainer.on_evaluate(again) == "duplicate"
        assert endpoint.puts[1:] == [{"green": 10, "blue": 90}, {"green": 50, "blue": 50}]

    def test_a_crash_between_the_put_and_its_record_is_repaired_from_the_endpoint(self) -> None:
        w, endpoint = canary_world()
        endpoint.lose_answer_of_put = 3  # step 2
        w.deliver()
        w.deliver()
        hold = step_message(w)
        w.clock.advance(minutes=5)
        assert w.retrainer.on_evaluate(hold, delivery=Delivery("m-1")) == "retry"
        canary = latest_run(w)["deployment"]["canary"]
        assert (canary["phase"], canary["step"]) == ("moving", 1)
        # The PUT got no answer: the endpoint is read again only once it must have acted.
        ((_, copy, delay),) = w.outbox.take()
        assert delay >= w.retrainer._ctx.timing.call_bound
        assert w.retrainer.on_evaluate(copy, delivery=Delivery("m-2")) == "canary"
        canary = latest_run(w)["deployment"]["canary"]
        assert (canary["phase"], canary["step"]) == ("holding", 1)
        assert endpoint.puts.count({"green": 50, "blue": 50}) == 1  # read, not sent again
        assert drain(w)[-1] == "promoted"


class TestFailure:
    def test_a_refused_put_at_step_2_restores_the_saved_map_and_keeps_the_champion(
        self,
    ) -> None:
        w, endpoint = canary_world()
        endpoint.refuse_put = 3
        before = champion(w)
        answers = drain(w)
        assert answers[-1] == "failed"
        assert endpoint.puts[1:] == [{"green": 10, "blue": 90}, {"blue": 100}]
        run = latest_run(w)
        assert run["state"] == "failed"
        assert "canary stopped at step 2 of 3 (50 % to green)" in run["error"]
        assert "400 traffic (injected)" in run["error"]
        assert "traffic restored to {'blue': 100}" in run["error"]
        assert champion(w) == before
        assert "still serves the champion" in run["target_after"]
        assert "restore_pending" not in run

    def test_a_failing_smoke_request_during_a_hold_restores_the_saved_map(self) -> None:
        w, endpoint = canary_world(smoke_each_step=True)
        endpoint.smoke_failures = [None, "the smoke request to deployment green failed: 500"]
        drain(w)
        assert endpoint.map == {"blue": 100}
        assert endpoint.puts[-1] == {"blue": 100}
        assert {"green": 100} not in endpoint.puts
        assert "step 2 of 3" in latest_run(w)["error"]
        assert "smoke request to deployment green failed" in latest_run(w)["error"]

    def test_a_step_that_never_settles_is_stopped_at_the_deadline(self) -> None:
        w, endpoint = canary_world()
        endpoint.stuck_put = 3
        start = w.clock.now()
        drain(w)
        run = latest_run(w)
        assert "the promotion's deadline" in run["error"]
        assert "step 2 of 3" in run["error"]
        assert endpoint.map == {"blue": 100}
        assert w.clock.now() - start <= timedelta(minutes=32)

    def test_a_rollback_after_the_canary_moves_all_traffic_back_at_once(self) -> None:
        w, endpoint = canary_world()
        drain(w)
        w.retrainer.rollback("housing", by="carol")
        drain(w)
        assert endpoint.puts[-1] == {"blue": 100}
        assert endpoint.puts[-2] == {"green": 100}  # no steps on the way back
        assert latest_run(w)["state"] == "promoted"


class TestLease:
    def test_a_hold_longer_than_the_deploy_lease_lets_no_other_run_or_delivery_in(
        self,
    ) -> None:
        w, endpoint = canary_world(timeout="PT1H", hold="PT10M")
        first = champion(w)
        assert Timing(timedelta(seconds=30), timedelta(minutes=10)).deploy_lease < HOLD * 2
        w.deliver()
        w.deliver()
        hold = step_message(w)
        run = latest_run(w)
        claim = run["deployment"]["claim"]
        w.clock.advance(minutes=9)
        waiter = EvaluateRun(model="housing", run_id=run["run_id"], poll=0, lease=claim)
        assert w.retrainer.on_evaluate(waiter, delivery=Delivery("w-1")) == "duplicate"
        with pytest.raises(InputRejected, match="in progress"):
            w.retrainer.rollback("housing", first, by="carol")
        assert latest_run(w)["deployment"]["claim"] == claim
        assert endpoint.puts[1:] == [{"green": 10, "blue": 90}]
        w.clock.advance(minutes=1)
        assert w.retrainer.on_evaluate(hold) == "canary"
        assert drain(w)[-1] == "promoted"


def endpoint_spec(**canary: Any) -> OnlineEndpointSpec:
    return OnlineEndpointSpec.model_validate({**TARGET, "canary": canary})


class TestValidation:
    @pytest.mark.parametrize(
        ("canary", "message"),
        [
            ({"steps": [50, 10], "hold": "PT1M"}, "must be strictly increasing"),
            ({"steps": [10, 10], "hold": "PT1M"}, "must be strictly increasing"),
            ({"steps": [0, 50], "hold": "PT1M"}, "step 0 is not a share of traffic from 1 to 99"),
            ({"steps": [10, 100], "hold": "PT1M"}, "100 follows the last step"),
            ({"steps": [], "hold": "PT1M"}, "at least 1 item"),
            ({"steps": [10], "hold": "PT0S"}, "hold PT0S must be at least 1 second"),
            ({"steps": [10], "hold": "soon"}, "duration"),
            (
                {"steps": [10, 50], "hold": "PT10M"},
                "2 steps held PT10M each take PT20M, more than half of provisioning_timeout "
                "(PT30M)",
            ),
        ],
    )
    def test_a_bad_canary_is_refused_at_load_naming_the_problem(
        self, canary: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
            endpoint_spec(**canary)

    def test_a_canary_too_long_for_the_deadline_names_the_fix(self) -> None:
        with pytest.raises(ValidationError, match="set provisioning_timeout to at least PT40M"):
            endpoint_spec(steps=[10, 50], hold="PT10M")

    def test_a_smoke_at_each_step_needs_a_smoke_request(self) -> None:
        with pytest.raises(ValidationError, match="smoke_each_step needs a smoke_request"):
            OnlineEndpointSpec.model_validate(
                {
                    **TARGET,
                    "smoke_request": None,
                    "canary": {"steps": [10], "hold": "PT1M", "smoke_each_step": True},
                }
            )

    def test_a_good_canary_loads(self) -> None:
        spec = endpoint_spec(steps=[5, 25, 50], hold="PT4M")
        assert spec.canary is not None
        assert spec.canary.holding == timedelta(minutes=12)
