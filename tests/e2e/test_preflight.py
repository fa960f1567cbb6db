"""Preflight: the operator's check that a model's target is updatable as configured."""

from __future__ import annotations

import pytest

from localdev.sample import housing_csv
from retrain.cli import main
from tests.stack_support import STORAGE_MODES, MakeStack

pytestmark = pytest.mark.e2e


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


def test_classic_preflight_reports_the_updatable_resource(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stack()
    assert main(["preflight"]) == 0
    out = capsys.readouterr().out
    assert "housing: ok" in out
    assert "resource 'Housing Model [trained model]' is updatable" in out


def test_wrong_resource_name_fails_with_close_matches(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stack(classic={"resource_name": "Housing Model [Trained Model]"})
    assert main(["preflight", "housing"]) == 1
    out = capsys.readouterr().out
    assert "housing: FAILED" in out
    assert "has no resource named 'Housing Model [Trained Model]'" in out
    assert "did you mean ['Housing Model [trained model]']" in out


def test_default_endpoint_fails_preflight_with_the_fix(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://127.0.0.1:9/workspaces/ws1/webservices/housing-predict/endpoints/default"
    make_stack(classic={"endpoint_url": url})
    assert main(["preflight"]) == 1
    err = capsys.readouterr().err
    assert "configuration: FAILED" in err
    assert "the default endpoint cannot be patched; add a non-default endpoint" in err


def test_new_preflight_and_first_promotion_refuse_a_read_only_service(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    s = make_stack(web_service={"read_only": True}, new={})
    assert main(["preflight"]) == 1
    assert "is read-only" in capsys.readouterr().out
    s.upload("housing/a.csv", housing_csv(100, seed=31))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "failed"
    assert "is read-only" in run["error"]


def test_new_preflight_names_the_asset(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stack(new={})
    assert main(["preflight"]) == 0
    assert "asset 'Housing Model [trained model]' (asset2)" in capsys.readouterr().out


def test_a_wrong_bes_key_fails_check_and_preflight_naming_the_setting(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_stack()
    monkeypatch.setenv("RETRAIN_BES_KEY_HOUSING", "not-the-bes-key")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL BES of housing: BES refused the key in app setting RETRAIN_BES_KEY_HOUSING" in out
    assert "ok  target of housing" in out
    assert main(["preflight"]) == 1
    out = capsys.readouterr().out
    assert "housing: FAILED" in out
    assert "RETRAIN_BES_KEY_HOUSING" in out
    assert "not-the-bes-key" not in out
    assert s.emulator.jobs == {}
    assert s.emulator.started == []


def test_check_probes_bes_without_starting_anything(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    s = make_stack()
    assert main(["check"]) == 0
    assert "ok  BES of housing: BES service answers and accepts the key" in capsys.readouterr().out
    assert s.emulator.count("GET", "/jobs/0{32}$", 404) == 1
    assert s.emulator.jobs == {}
