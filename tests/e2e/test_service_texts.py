"""Texts that come from a service are stored, shown, announced and logged without secrets."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from localdev.sample import housing_csv
from localdev.stack import DEV_KEY
from retrain.cli import main
from tests.stack_support import STORAGE_MODES, MakeStack

pytestmark = pytest.mark.e2e


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


def test_failed_job_whose_details_echo_the_input_sas_leaks_it_nowhere(
    make_stack: MakeStack,
    webhook: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, received, _ = webhook
    monkeypatch.setenv("RETRAIN_WEBHOOK_URL", url)
    monkeypatch.setenv("RETRAIN_WEBHOOK_SECRET", "s3cret")
    caplog.set_level(logging.DEBUG)
    s = make_stack()
    container = s.settings["RETRAIN_DATA_CONTAINER"]
    now = datetime.now(UTC)
    # Signed as the app signs in this storage mode: with the account key, or (identity) with a
    # user delegation key, whose token also carries the skoid/sktid/skt/ske/sks/skv fields.
    signing: dict[str, Any] = (
        {"user_delegation_key": s.blobs.get_user_delegation_key(now, now + timedelta(hours=1))}
        if s.storage_mode == "identity"
        else {"account_key": DEV_KEY}
    )
    sas = generate_blob_sas(
        "devstoreaccount1",
        container,
        "housing/a.csv",
        permission=BlobSasPermissions(read=True),
        expiry=now + timedelta(hours=1),
        **signing,
    )
    signature = next(p for p in sas.split("&") if p.startswith("sig=")).removeprefix("sig=")
    blob_url = s.blobs.get_blob_client(container, "housing/a.csv").url
    s.emulator.faults.fail_jobs = 1
    s.emulator.faults.fail_details = (
        f"Error 0000: Failed to read {blob_url}?{sas} (AuthenticationFailed); token ?{sas}"
    )
    s.upload("housing/a.csv", housing_csv(100, seed=61))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "failed"
    assert "Error 0000: Failed to read" in run["error"]

    assert main(["--json", "runs"]) == 0
    listed = capsys.readouterr().out
    assert main(["show", run["run_id"]]) == 0
    shown = capsys.readouterr().out
    assert "AuthenticationFailed" in shown
    events = [body.decode() for _, body in received]
    assert any(json.loads(e)["state"] == "failed" for e in events)
    app_log = "\n".join(
        logging.Formatter().format(r) for r in caplog.records if r.threadName == "MainThread"
    )
    for where, text in {
        "run document": json.dumps(run),
        "runs --json": listed,
        "show": shown,
        "webhook bodies": "\n".join(events),
        "log": app_log,
    }.items():
        assert "sig=" + signature[:8] not in text, where
        assert signature[:12] not in text, where
