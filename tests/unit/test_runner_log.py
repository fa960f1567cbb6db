"""The local runner's log lines say how serious each one is."""

from __future__ import annotations

import io
import logging

from localdev.runner import log_handler


def test_every_runner_log_line_carries_its_level_name() -> None:
    stream = io.StringIO()
    handler = log_handler(stream)
    for level, text in ((logging.INFO, "batched"), (logging.ERROR, "run failed")):
        handler.handle(logging.LogRecord("retrain.pipeline", level, __file__, 1, text, None, None))
    info, error = stream.getvalue().splitlines()
    assert " INFO    retrain.pipeline batched" in info
    assert " ERROR   retrain.pipeline run failed" in error
