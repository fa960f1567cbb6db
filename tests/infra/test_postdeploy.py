"""infra/hooks/postdeploy.sh against a fake `az`: it subscribes `ingest` to the data container
with the blob trigger's webhook, keeps the key out of its output, and gives up with the fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.infra.bicep import INFRA

HOOK = INFRA / "hooks" / "postdeploy.sh"
KEY = "k3y-v4lue_0123456789=="

FAKE_AZ = """#!/bin/sh
echo "$*" >> "$RECORD/calls"
case "$1 $2" in
  "functionapp show") echo "func-retrain-abc.azurewebsites.net" ;;
  "functionapp keys")
    n=$(cat "$RECORD/key_polls" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$RECORD/key_polls"
    if [ "$n" -ge "${KEY_AFTER:-1}" ]; then echo "$FAKE_KEY"; fi ;;
  "deployment group")
    for arg in "$@"; do
      case "$arg" in
        @*) cp "${arg#@}" "$RECORD/params.json"; echo "${arg#@}" > "$RECORD/params_path" ;;
      esac
    done ;;
esac
"""


@pytest.fixture
def fake_path(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "az": FAKE_AZ,
        "curl": "#!/bin/sh\nexit 0\n",
        "sleep": "#!/bin/sh\n",
    }.items():
        tool = bin_dir / name
        tool.write_text(body, encoding="utf-8")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_hook(tmp_path: Path, fake_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": f"{fake_path}{os.pathsep}{os.environ['PATH']}",
        "RECORD": str(tmp_path),
        "FAKE_KEY": KEY,
        "AZURE_RESOURCE_GROUP": "rg-retrain",
        "AZURE_FUNCTION_APP_NAME": "func-retrain-abc",
        "RETRAIN_SYSTEM_TOPIC_NAME": "evgt-retrain-abc",
        "RETRAIN_DATA_CONTAINER": "training-data",
        **env,
    }
    return subprocess.run(
        ["/bin/sh", str(HOOK)], env=environment, capture_output=True, text=True, check=False
    )


def test_blob_trigger_subscription_gets_the_webhook_and_the_data_container(tmp_path, fake_path):
    done = run_hook(tmp_path, fake_path, KEY_AFTER="3", RETRAIN_INGEST_TRIGGER="blob")
    assert done.returncode == 0, done.stderr
    deploy = (tmp_path / "calls").read_text().splitlines()[-1]
    assert deploy.startswith("deployment group create -g rg-retrain")
    assert str(INFRA / "eventgrid-subscription.bicep") in deploy
    assert "dataContainerName=training-data" in deploy
    assert "systemTopicName=evgt-retrain-abc" in deploy
    assert "ingestTrigger=blob" in deploy
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["parameters"]["blobsWebhookUrl"]["value"] == (
        "https://func-retrain-abc.azurewebsites.net/runtime/webhooks/blobs"
        f"?functionName=Host.Functions.ingest&code={KEY}"
    )
    assert (tmp_path / "key_polls").read_text().strip() == "3"  # waited for the host's key
    # The key is in no argument, no output, and its file is gone.
    assert KEY not in (tmp_path / "calls").read_text()
    assert KEY not in done.stdout + done.stderr
    assert not Path((tmp_path / "params_path").read_text().strip()).exists()


def test_event_grid_trigger_needs_no_key(tmp_path, fake_path):
    done = run_hook(tmp_path, fake_path, RETRAIN_INGEST_TRIGGER="eventgrid")
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text()
    assert "keys list" not in calls
    assert "ingestTrigger=eventgrid" in calls.splitlines()[-1]
    assert json.loads((tmp_path / "params.json").read_text())["parameters"] == {}


def test_no_key_gives_up_after_the_attempts_with_the_fix(tmp_path, fake_path):
    done = run_hook(tmp_path, fake_path, KEY_AFTER="99", RETRAIN_KEY_ATTEMPTS="4")
    assert done.returncode == 1
    assert "no blobs_extension key on func-retrain-abc after 4 attempts" in done.stderr
    assert "RETRAIN_INGEST_TRIGGER=blob" in done.stderr
    assert "deployment group" not in (tmp_path / "calls").read_text()


def test_missing_azd_output_is_named(tmp_path, fake_path):
    done = run_hook(tmp_path, fake_path, RETRAIN_DATA_CONTAINER="")
    assert done.returncode != 0
    assert "RETRAIN_DATA_CONTAINER" in done.stderr
