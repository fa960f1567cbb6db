"""Operating the app: approval, rollback, events and webhooks, poison, the sweep, the CLI; with
a connection string and with an identity connection (see the `storage_mode` fixture)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import pytest

from localdev.sample import housing_csv
from retrain import wiring
from retrain.cli import main
from tests.stack_support import STORAGE_MODES, MakeStack, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    """Run the CLI with --json; returns the exit code and the parsed output (or stderr)."""
    code = main(["--json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else captured.err


def endpoint(s: Stack) -> Any:
    return s.emulator.endpoints[("ws1", "housing-predict", "prod")]


class TestApproval:
    def test_manual_mode_waits_then_approve_promotes(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        s = make_stack(promotion="manual")
        s.upload("housing/a.csv", housing_csv(200, seed=41, noise=2))
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "awaiting_approval"
        assert endpoint(s).model is None
        code, listed = cli(capsys, "runs", "--state", "awaiting_approval")
        assert code == 0
        assert [r["run_id"] for r in listed] == [run["run_id"]]
        code, result = cli(capsys, "approve", run["run_id"], "--by", "alice")
        assert (code, result["state"]) == (0, "promoting")
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "promoted"
        assert run["approved_by"] == "alice"
        assert endpoint(s).model is not None

    def test_newer_passing_run_supersedes_and_reject_records_who_and_why(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        s = make_stack(promotion="manual")
        s.upload("housing/a.csv", housing_csv(200, seed=42, noise=2))
        s.runner.run_until_idle()
        s.upload("housing/b.csv", housing_csv(200, seed=43, noise=2))
        s.runner.run_until_idle()
        first, second = s.runs()
        assert first["state"] == "superseded"
        assert f"superseded by run {second['run_id']}" in first["history"][-1]["note"]
        assert second["state"] == "awaiting_approval"
        assert cli(capsys, "approve", first["run_id"]) == (
            2,
            f"error: run {first['run_id']} is superseded, not awaiting approval\n",
        )
        code, _ = cli(capsys, "reject", second["run_id"], "--by", "bob", "--reason", "drift")
        assert code == 0
        second = s.runs()[1]
        assert second["state"] == "rejected"
        assert second["rejected_by"] == "bob"
        assert second["history"][-1]["note"] == "rejected by bob: drift"
        assert s.model_state()["awaiting_approval"] is None


class TestRollback:
    def test_rollback_redeploys_the_previous_champion_with_a_fresh_sas(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Works whatever became of the BES result SAS: the app mints its own for its blob."""
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(60, seed=44, noise=30))
        s.runner.run_until_idle()
        first_served = s.predict([[3.0, 20.0, 5.0]])
        s.upload("housing/b.csv", housing_csv(400, seed=45, noise=1))
        s.runner.run_until_idle()
        first, second = s.runs()
        assert s.predict([[3.0, 20.0, 5.0]]) != first_served

        code, result = cli(capsys, "rollback", "housing", "--by", "carol")
        assert code == 0
        s.runner.run_until_idle()
        rollback = s.runs()[-1]
        assert rollback["run_id"] == result["run_id"]
        assert (rollback["kind"], rollback["restores"], rollback["state"]) == (
            "rollback",
            first["run_id"],
            "promoted",
        )
        assert s.predict([[3.0, 20.0, 5.0]]) == first_served
        state = s.model_state()
        assert state["champion"]["model"] == first["outputs"]["model"]
        assert state["previous_champion"]["run_id"] == second["run_id"]
        sas = parse_qs(endpoint(s).patches[-1]["SasBlobToken"].lstrip("?"))
        assert sas["sp"] == ["r"]
        assert ("skoid" in sas) == (s.storage_mode == "identity")  # a user delegation SAS
        assert datetime.fromisoformat(sas["se"][0].replace("Z", "+00:00")) > datetime.now(UTC)
        code, err = cli(capsys, "rollback", "housing", "--to", first["run_id"])
        assert code == 2
        assert "already serves the model of run" in err


class TestEvents:
    def test_every_state_change_reaches_the_webhook_signed(
        self, make_stack: MakeStack, webhook: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        url, received, _ = webhook
        monkeypatch.setenv("RETRAIN_WEBHOOK_URL", url)
        monkeypatch.setenv("RETRAIN_WEBHOOK_SECRET", "s3cret")
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(100, seed=46))
        s.runner.run_until_idle()
        states = [json.loads(body)["state"] for _, body in received]
        assert states == ["queued", "submitted", "running", "trained", "promoting", "promoted"]
        now = datetime.now(UTC).timestamp()
        for headers, body in received:
            scheme = dict(p.split("=", 1) for p in headers["X-Retrain-Signature"].split(","))
            signed = scheme["t"].encode() + b"." + body
            expected = hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(scheme["v1"], expected)
            assert abs(now - int(scheme["t"])) < 300
        deliveries = [headers["X-Retrain-Delivery"] for headers, _ in received]
        assert len(set(deliveries)) == len(deliveries)
        last = json.loads(received[-1][1])
        assert last["metrics"]["Root Mean Squared Error"] > 0
        assert last["run_id"] == s.runs()[0]["run_id"]

    def test_a_failing_webhook_does_not_block_promotion(
        self, make_stack: MakeStack, webhook: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        url, received, statuses = webhook
        statuses.extend([500] * 3)
        monkeypatch.setenv("RETRAIN_WEBHOOK_URL", url)
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(100, seed=47))
        s.runner.run_until_idle()
        assert s.runs()[0]["state"] == "promoted"
        delivered = [json.loads(b)["state"] for _, b in received]
        assert len(delivered) == 6 + 3  # three answered 500 and were delivered again
        assert set(delivered) == {
            "queued",
            "submitted",
            "running",
            "trained",
            "promoting",
            "promoted",
        }


class TestPoison:
    def test_poisoned_message_fails_its_run_and_replay_finishes_it(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        s = make_stack(new={})
        s.emulator.faults.http = [
            {"method": "PATCH", "path": "/webServices/", "status": 409} for _ in range(5)
        ]
        s.upload("housing/a.csv", housing_csv(100, seed=48))
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "failed"
        assert "failed on every delivery and was moved to" in run["error"]
        code, kept = cli(capsys, "poison")
        assert code == 0
        assert [(k["run_id"], k["replayed"]) for k in kept] == [(run["run_id"], False)]

        code, result = cli(capsys, "poison", "--replay")
        assert (code, len(result["replayed"])) == (0, 1)
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "promoted", (run["error"], run["history"][-4:])
        assert "revived to replay its poisoned message" in [h["note"] for h in run["history"]]

    def test_undecodable_message_is_kept_with_its_reason(self, make_stack: MakeStack) -> None:
        s = make_stack()
        jobs = s.settings["RETRAIN_JOBS_QUEUE"]
        s.queue(jobs + "-poison").send_message("bm90IGpzb24=")
        s.runner.run_until_idle()
        (kept,) = wiring.retrainer().poisoned()
        assert kept["queue"] == jobs
        assert kept["reason"].startswith("the message cannot be parsed")


class TestSweep:
    def test_lost_tracking_message_is_redriven(
        self, make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("RETRAIN_SWEEP_STALL", "PT1S")
        s = make_stack()
        s.emulator.faults.job_seconds = 1
        s.upload("housing/a.csv", housing_csv(100, seed=49))
        s.step_until_running()
        s.queue(s.settings["RETRAIN_JOBS_QUEUE"]).clear_messages()  # the poll message is lost
        assert s.runner.pending() == 0
        for _ in range(400):
            if s.runs()[0]["state"] == "promoted":
                break
            s.runner.fire("sweep")
            s.runner.step()
        assert s.runs()[0]["state"] == "promoted"
        assert s.jobs_submitted() == 1

    def test_blob_without_an_event_is_ingested(self, make_stack: MakeStack) -> None:
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(100, seed=50))
        s.runner.lose_blob_event(s.settings["RETRAIN_DATA_CONTAINER"], "housing/a.csv")
        s.runner.run_until_idle()
        assert s.runs() == []
        assert s.runner.fire("sweep")
        s.runner.run_until_idle()
        assert [r["state"] for r in s.runs()] == ["promoted"]

    def test_concurrent_sweeps_redrive_once(
        self, make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("RETRAIN_SWEEP_STALL", "PT1S")
        s = make_stack()
        s.emulator.faults.hang_jobs = True
        s.upload("housing/a.csv", housing_csv(100, seed=51))
        s.step_until_running()
        s.queue(s.settings["RETRAIN_JOBS_QUEUE"]).clear_messages()
        app = wiring.retrainer()
        counts: list[dict[str, int]] = []
        barrier = threading.Barrier(2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the run counts as stalled
            barrier.reset()

            def sweep() -> None:
                barrier.wait()
                counts.append(app.sweep())

            threads = [threading.Thread(target=sweep) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if any(c["runs"] for c in counts):
                break
        assert sum(c["runs"] for c in counts) == 1, counts[-4:]
        assert s.runner.pending() == 1


class TestCli:
    def test_show_runs_retrain_and_check(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(100, seed=52))
        s.runner.run_until_idle()
        (run,) = s.runs()

        code, shown = cli(capsys, "show", run["run_id"])
        assert code == 0
        assert shown["state"] == "promoted"
        assert [h["state"] for h in shown["history"]] == [
            "queued",
            "submitted",
            "running",
            "trained",
            "promoting",
            "promoted",
        ]
        assert main(["show", run["run_id"]]) == 0
        text = capsys.readouterr().out
        assert f"run {run['run_id']} of housing: promoted" in text
        assert "challenger: " in text
        assert "Root Mean Squared Error" in text

        code, err = cli(capsys, "retrain", "housing", "--by", "dave")
        assert code == 2  # the same data again: refused, naming the run that trained it
        assert f"already trained by run {run['run_id']}" in err
        code, batch = cli(
            capsys, "retrain", "housing", "--by", "dave", "--force", "--reason", "BES was down"
        )
        assert code == 0
        s.runner.run_until_idle()
        retrained = s.runs()[-1]
        assert retrained["run_id"] == batch["batch_id"]
        assert s.run_files(retrained)[0]["requested"] == "requested by dave: BES was down"
        assert retrained["forced"] is True
        assert retrained["state"] in ("promoted", "rejected")

        code, runs = cli(capsys, "runs", "--model", "housing")
        assert (code, len(runs)) == (0, 2)
        assert main(["runs"]) == 0
        assert capsys.readouterr().out.splitlines()[0].split() == [
            "RUN",
            "MODEL",
            "STATE",
            "FILES",
            "UPDATED",
            "REASON",
        ]

        code, checks = cli(capsys, "check")
        assert code == 0
        names = {c["check"] for c in checks}
        assert names >= {"configuration", "storage mode", "model states", "target of housing"}
        assert any(n.startswith("write to retrain-artifacts") for n in names), names
        assert any(n.startswith("send to retrain-jobs") for n in names), names
        assert all(c["ok"] for c in checks), checks
        (mode,) = [c["detail"] for c in checks if c["check"] == "storage mode"]
        if s.storage_mode == "identity":
            assert mode.startswith("identity: ")
            assert "SAS tokens signed with user delegation keys" in mode
            assert any(n == "user delegation key" for n in names), names
        else:
            assert mode.startswith("connection string (AzureWebJobsStorage)")

    def test_errors_say_what_to_do_with_nonzero_exit_codes(
        self, make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        make_stack(classic={"api_key_setting": "RETRAIN_MISSING_KEY"})
        assert cli(capsys, "show", "nope") == (
            2,
            "error: no run 'nope'; list runs with `python -m retrain runs`\n",
        )
        code, err = cli(capsys, "retrain", "housing")
        assert code == 2
        assert "no data under" in err
        code, err = cli(capsys, "rollback", "housing")
        assert (code, err) == (2, "error: housing has no previous champion to roll back to\n")
        code, checks = cli(capsys, "check")
        assert code == 1
        failed = [c for c in checks if not c["ok"]]
        assert failed[0]["check"] == "target of housing"
        assert "app setting RETRAIN_MISSING_KEY" in failed[0]["detail"]
