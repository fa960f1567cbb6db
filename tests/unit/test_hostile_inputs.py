"""Hostile input corpus: every case must end in a clear error that names the problem.

Arriving files are judged from their name, size and first bytes (as the ingest step reads
them); queue bodies, Evaluate Model outputs, BES answers and configuration through the parsers
the functions use. Each case is one test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import responses

from retrain.bes import parse_state
from retrain.errors import ConfigError, EvaluationError, InputRejected, MessageError, RemoteError
from retrain.evaluation import decide, parse_evaluation_csv
from retrain.ingest import route, validate
from retrain.messages import parse_evaluation, parse_jobs
from retrain.settings import GateSpec, load_models
from tests.client_support import JOBS
from tests.client_support import bes as client
from tests.harness import raw_spec, spec

SPEC = spec(columns=["rooms", "price"], max_bytes=10_000)
GOOD = b"rooms,price\n1,2\n"


def file(name: str, head: bytes, size: int | None = None) -> Callable[[], Any]:
    def check() -> Any:
        return validate(
            route(name, [SPEC]), name, size=len(head) if size is None else size, head=head
        )

    return check


def gate(challenger: dict[str, float]) -> Callable[[], Any]:
    """The gate on an AUC challenger against a 0.5 champion: impossible metrics must raise."""
    return lambda: decide(GateSpec(metric="AUC"), challenger, {"AUC": 0.5})


class Refused(Exception):
    """Raised by the test, not the code: the gate answered with a refusal (not an error)."""


def gate_refuses(challenger: dict[str, float]) -> Callable[[], Any]:
    def check() -> Any:
        decision = decide(GateSpec(metric="AUC"), challenger, {"AUC": 0.5})
        if not decision.promote:
            raise Refused(decision.reason)
        return decision

    return check


def bes_reply(body: Any) -> Callable[[], Any]:
    def check() -> Any:
        with responses.RequestsMock() as mock:
            mock.get(f"{JOBS}/abc", json=body)
            return client().status("abc")

    return check


def models(**overrides: Any) -> Callable[[], Any]:
    return lambda: load_models(json.dumps([raw_spec(**overrides)]), None)


def training(**overrides: Any) -> dict[str, Any]:
    return raw_spec()["training"] | overrides


CORPUS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # arriving files
    ("empty blob", file("housing/a.csv", b""), InputRejected, "the file is empty"),
    (
        "binary data",
        file("housing/a.csv", b"\x89PNG\r\n\x1a\n\x00\x00"),
        InputRejected,
        "NUL bytes: binary data",
    ),
    (
        "wrong delimiter",
        file("housing/a.tsv", GOOD),
        InputRejected,
        "wrong delimiter for a .tsv file",
    ),
    (
        "semicolons in a csv",
        file("housing/a.csv", b"rooms;price\n1;2\n"),
        InputRejected,
        "the header lacks columns ['rooms', 'price']",
    ),
    (
        "header only",
        file("housing/a.csv", b"rooms,price\n"),
        InputRejected,
        "header but no data rows",
    ),
    (
        "header not matching",
        file("housing/a.csv", b"size,cost\n1,2\n"),
        InputRejected,
        "the header lacks columns ['rooms', 'price']; it has ['size', 'cost']",
    ),
    (
        "one enormous line",
        file("housing/a.csv", b"r" * 5000, size=9_000),
        InputRejected,
        "the first line is longer than 5000 bytes",
    ),
    (
        "enormous header cell",
        file("housing/a.csv", b"r" * 3000 + b"\n1\n"),
        InputRejected,
        "it has ['rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr…']",
    ),
    (
        "invalid UTF-8 header",
        file("housing/a.csv", b"ro\xffoms,price\n1,2\n"),
        InputRejected,
        "the header is not valid UTF-8 (byte 2)",
    ),
    (
        "blank first line",
        file("housing/a.csv", b"\n\nrooms,price\n"),
        InputRejected,
        "the first line is blank",
    ),
    (
        "over the size limit",
        file("housing/a.csv", GOOD, size=20_000),
        InputRejected,
        "the file is 20000 bytes; the limit for housing is 10000",
    ),
    (
        "not csv by name",
        file("housing/a.json", b"{}"),
        InputRejected,
        "not a CSV or TSV file by its name (extension .json)",
    ),
    ("no extension", file("housing/data", GOOD), InputRejected, "(extension missing)"),
    ("dot-dot in the name", file("housing/../etc/a.csv", GOOD), InputRejected, "'..' path segment"),
    (
        "empty path segment",
        file("housing//a.csv", GOOD),
        InputRejected,
        "an empty, '.' or '..' path segment",
    ),
    (
        "name over 1024 characters",
        file("housing/" + "x" * 1100 + ".csv", GOOD),
        InputRejected,
        "the blob name is 1112 characters; at most 1024",
    ),
    (
        "newline in the name",
        file("housing/a\nb.csv", GOOD),
        InputRejected,
        "the blob name contains the control character '\\n' (U+000A)",
    ),
    (
        "tab in the name",
        file("housing/a\tb.csv", GOOD),
        InputRejected,
        "control character '\\t' (U+0009)",
    ),
    (
        "backslash in the name",
        file("housing/a\\b.csv", GOOD),
        InputRejected,
        "contains a backslash, which Azure Storage turns into '/'",
    ),
    (
        "segment ending in a dot",
        file("housing/dir./a.csv", GOOD),
        InputRejected,
        "ends with '.', which Azure Storage drops",
    ),
    (
        "under no model's prefix",
        file("other/a.csv", GOOD),
        InputRejected,
        "'other/a.csv' is under no model's data prefix",
    ),
    (
        "prefix without the slash",
        file("housingextra/a.csv", GOOD),
        InputRejected,
        "is under no model's data prefix",
    ),
    # queue messages
    (
        "malformed queue JSON",
        lambda: parse_jobs('{"version": 1,'),
        MessageError,
        "not a jobs-queue message",
    ),
    (
        "unknown message version",
        lambda: parse_jobs('{"version": 9, "kind": "track-run", "model": "m", "run_id": "r"}'),
        MessageError,
        "version",
    ),
    (
        "extra field",
        lambda: parse_jobs(
            '{"version": 1, "kind": "track-run", "model": "m", "run_id": "r", "admin": true}'
        ),
        MessageError,
        "admin: Extra inputs are not permitted",
    ),
    (
        "missing field",
        lambda: parse_evaluation('{"version": 1, "kind": "evaluate-run", "model": "m"}'),
        MessageError,
        "run_id: Field required",
    ),
    (
        "unknown kind",
        lambda: parse_jobs('{"version": 1, "kind": "deploy", "model": "m"}'),
        MessageError,
        "does not match any of the expected tags",
    ),
    (
        "oversized message",
        lambda: parse_jobs("[" + "1," * 40_000 + "1]"),
        MessageError,
        "exceeds 49152",
    ),
    (
        "model name with a path",
        lambda: parse_jobs('{"version": 1, "kind": "track-run", "model": "../x", "run_id": "r"}'),
        MessageError,
        "model: String should match pattern",
    ),
    (
        "run id with a path",
        lambda: parse_jobs(
            '{"version": 1, "kind": "track-run", "model": "m", "run_id": "../../models/m"}'
        ),
        MessageError,
        "run_id: String should match pattern",
    ),
    (
        "batch id with a dot-dot",
        lambda: parse_jobs(
            '{"version": 1, "kind": "check-batch", "model": "m", "batch_id": "..", "arrivals": 1}'
        ),
        MessageError,
        "batch_id: String should match pattern",
    ),
    (
        "negative poll",
        lambda: parse_jobs(
            '{"version": 1, "kind": "track-run", "model": "m", "run_id": "r", "poll": -1}'
        ),
        MessageError,
        "poll: Input should be greater than or equal to 0",
    ),
    # Evaluate Model outputs
    ("empty evaluation", lambda: parse_evaluation_csv(""), EvaluationError, "empty"),
    (
        "evaluation header only",
        lambda: parse_evaluation_csv("AUC,Accuracy\n"),
        EvaluationError,
        "has a header but no data row",
    ),
    (
        "evaluation with 3 rows",
        lambda: parse_evaluation_csv("AUC\n1\n2\n3\n"),
        EvaluationError,
        "has 3 data rows",
    ),
    (
        "ragged evaluation row",
        lambda: parse_evaluation_csv("AUC,Accuracy\n0.9\n"),
        EvaluationError,
        "line 2 of the evaluation output has 1 cells, the header 2",
    ),
    (
        "no numeric metric",
        lambda: parse_evaluation_csv("Label\nyes\n"),
        EvaluationError,
        "no numeric metric",
    ),
    (
        "gate metric missing",
        gate_refuses({"Accuracy": 0.9}),
        Refused,
        "the evaluation has no 'AUC' column (the gate metric)",
    ),
    ("NaN metric", gate({"AUC": math.nan}), EvaluationError, "AUC is nan"),
    ("Infinity metric", gate({"AUC": math.inf}), EvaluationError, "AUC is inf"),
    ("AUC of 93", gate({"AUC": 93.0}), EvaluationError, "AUC is 93, outside its valid range"),
    ("negative AUC", gate({"AUC": -0.4}), EvaluationError, "(between 0 and 1)"),
    (
        "negative RMSE in the CSV",
        lambda: parse_evaluation_csv("Root Mean Squared Error\n-5\n"),
        EvaluationError,
        "Root Mean Squared Error is -5, outside its valid range (at least 0)",
    ),
    (
        "R squared above 1",
        lambda: parse_evaluation_csv("Coefficient of Determination\n7.5\n"),
        EvaluationError,
        "Coefficient of Determination is 7.5, outside its valid range (at most 1)",
    ),
    (
        "duplicate gate column",
        lambda: parse_evaluation_csv("AUC,Accuracy, auc\n0.6,0.8,0.9\n"),
        EvaluationError,
        "two columns named 'AUC' and 'auc'",
    ),
    # BES answers
    (
        "unknown BES status",
        lambda: parse_state("Exploded"),
        RemoteError,
        "unknown StatusCode 'Exploded'",
    ),
    ("BES status out of range", lambda: parse_state(7), RemoteError, "unknown StatusCode 7"),
    (
        "BES Results as a list",
        bes_reply({"StatusCode": "Finished", "Results": ["output1"]}),
        RemoteError,
        "BES status abc: Results should be a JSON object, got list",
    ),
    (
        "BES result reference without a location",
        bes_reply({"StatusCode": "Finished", "Results": {"output1": {"BaseLocation": "x"}}}),
        RemoteError,
        "RelativeLocation should be a string, got NoneType",
    ),
    (
        "BES status of the wrong type",
        lambda: parse_state(None),
        RemoteError,
        "unknown StatusCode None",
    ),
    # configuration
    (
        "plain http off loopback",
        models(training=training(jobs_url="http://bes.example/w/services/s/jobs")),
        ConfigError,
        "uses plain http",
    ),
    (
        "not a URL",
        models(training=training(jobs_url="bes.example/jobs")),
        ConfigError,
        "training.bes.jobs_url: Input should be a valid URL",
    ),
    (
        "BES URL that is not .../jobs",
        models(training=training(jobs_url="https://bes.example/workspaces/w/services/s/execute")),
        ConfigError,
        "must be the BES '.../jobs' URL",
    ),
    (
        "same output twice",
        models(training=training(evaluation_output="output1")),
        ConfigError,
        "model_output and evaluation_output must name different outputs",
    ),
    (
        "unknown gate metric",
        models(gate={"metric": "Custom"}),
        ConfigError,
        "metric 'Custom' is not a known Evaluate Model metric",
    ),
    (
        "max_wait below quiet_period",
        models(quiet_period=600, max_wait=60),
        ConfigError,
        "max_wait must be at least quiet_period",
    ),
    (
        "model name with capitals",
        models(name="Housing"),
        ConfigError,
        "name: String should match pattern",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_input_gets_a_clear_error(
    case: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


TSV = b"rooms\tprice\n1\t2\n"
TRACK = '{"version": 1, "kind": "track-run", "model": "m", "run_id": "r"}'

NEAR_MISSES: list[tuple[str, Callable[[], Any], Any]] = [
    ("good csv", file("housing/a.csv", GOOD), ["rooms", "price"]),
    ("good tsv", file("housing/a.tsv", TSV), ["rooms", "price"]),
    ("upper-case extension", file("housing/a.CSV", GOOD), ["rooms", "price"]),
    (
        "BOM and CRLF",
        file("housing/a.csv", b"\xef\xbb\xbfrooms,price\r\n1,2\r\n"),
        ["rooms", "price"],
    ),
    ("extra column", file("housing/a.csv", b"rooms,price,age\n1,2,3\n"), ["rooms", "price", "age"]),
    (
        "spaces, '#' and non-ASCII in the name",
        file("housing/my #1 données.csv", GOOD),
        ["rooms", "price"],
    ),
    ("exactly at the size limit", file("housing/a.csv", GOOD, size=10_000), ["rooms", "price"]),
    (
        "data beyond the head",
        file("housing/a.csv", b"rooms,price\n", size=5_000),
        ["rooms", "price"],
    ),
    ("good message", lambda: parse_jobs(TRACK).run_id, "r"),
    ("good evaluation", lambda: parse_evaluation_csv("AUC\n0.9\n0.8\n").champion, {"AUC": 0.8}),
    ("better AUC", lambda: gate({"AUC": 0.9})().promote, True),
    ("AUC of exactly 1", lambda: gate({"AUC": 1.0})().promote, True),
    ("known BES status", lambda: parse_state("Finished").value, "Finished"),
    ("good configuration", lambda: list(models()()), ["housing"]),
]
"""The input next to each hostile one, which must pass: without these, a check that refused
everything with the expected message would pass the corpus."""


@pytest.mark.parametrize(("case", "call", "expected"), NEAR_MISSES, ids=[c[0] for c in NEAR_MISSES])
def test_the_near_miss_of_a_hostile_input_is_accepted(
    case: str, call: Callable[[], Any], expected: Any
) -> None:
    assert call() == expected
