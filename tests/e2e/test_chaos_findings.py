"""Defects the separate-process chaos run found, each reproduced deterministically in-process.

Found by `localdev.chaos` (seed 700001 with the fault mix "new target, lost responses, late
acts, dropped connections, reordering", worker processes killed at random): the emulator
recorded status GETs of one job 0.001 s apart and a second start of a running job.
"""

from __future__ import annotations

import threading

import pytest

from localdev.sample import housing_csv
from retrain import wiring
from retrain.messages import TrackRun
from retrain.pipeline import Delivery
from tests.stack_support import STORAGE_MODES, MakeStack

pytestmark = pytest.mark.e2e


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


def test_two_deliveries_of_a_submitted_run_make_one_status_call_and_one_start(
    make_stack: MakeStack,
) -> None:
    """A run whose start failed stays `submitted`; two copies of its track message (the sealing
    check and its harmless second copy each send one; the sweep re-drives one) may then be
    handled at once by two instances. Only one may ask BES for the job's status and start it:
    the start path is part of the run's one poll chain (two status calls of one job at least
    1 s apart, a job started once)."""
    st = make_stack()
    st.emulator.faults.http = [{"status": 503, "method": "POST", "path": "/start"}]
    st.upload("housing/part-0.csv", housing_csv(60, seed=1))
    for _ in range(200):
        runs = st.runs()
        if runs and runs[0]["state"] == "submitted" and st.emulator.count("POST", "/start$"):
            break
        st.runner.step()
    run = st.runs()[0]
    assert run["state"] == "submitted", run["state"]

    # The first copy's status call is slow to answer; the second copy arrives meanwhile.
    held = threading.Event()
    slow = st.emulator.slow

    def hold(seconds: float) -> None:
        held.set()
        slow(seconds)

    st.emulator.slow = hold  # type: ignore[method-assign]
    st.emulator.faults.http = [{"delay": 0.5, "method": "GET", "path": "/jobs/"}]
    app = wiring.retrainer()
    # The failed start re-sent the chain's next message (poll 1, handing on its start claim);
    # two copies of it now.
    message = TrackRun(model="housing", run_id=run["run_id"], poll=1, start=run["start"]["claim"])
    first = threading.Thread(
        target=app.on_track_run, args=(message,), kwargs={"delivery": Delivery("copy-1")}
    )
    first.start()
    assert held.wait(10)
    app.on_track_run(message, delivery=Delivery("copy-2"))
    first.join(10)

    kinds = [v["kind"] for v in st.emulator.violations]
    assert "poll under 1 s" not in kinds, st.emulator.violations
    assert "second start" not in kinds, st.emulator.violations
    assert len(st.emulator.started) == 1
