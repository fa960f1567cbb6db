"""Preflight: the operator's check that a model's target is updatable as configured."""

from __future__ import annotations

import pytest

from localdev.sample import housing_csv
from retrain.cli import main
from tests.e2e.conftest import MakeStack

pytestmark = pytest.mark.e2e


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
