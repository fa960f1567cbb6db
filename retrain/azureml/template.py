"""The user's REST-shaped job template and the placeholders the app fills (spec §3.2-3.5).

Placeholders are `{retrain.<name>}` anywhere in a string value:

- `{retrain.training_data}`: the `uri` of one input of type `uri_file` or `uri_folder`;
- `{retrain.model_output}`: the `uri` of one output (`uri_folder`, `custom_model` or
  `mlflow_model`), where the job writes the model;
- `{retrain.champion_model}`: the `uri` of an optional `custom_model`/`mlflow_model` input,
  the champion's model version, so the job scores it on the same hold-out data. With no
  champion yet the input is left out (the command must mark it optional: `$[[...]]`);
- `{retrain.job_name}`, `{retrain.model}`, `{retrain.batch}`: text, e.g. in `displayName`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from retrain.azureml.events import MODEL_TAG, RUN_TAG
from retrain.azureml.workspace import as_object
from retrain.errors import UsageError

PLACEHOLDER = re.compile(r"\{retrain\.([A-Za-z_]*)\}")
KNOWN = frozenset({"training_data", "model_output", "champion_model", "job_name", "model", "batch"})
DATA_TYPES = ("uri_file", "uri_folder")
MODEL_INPUT_TYPES = ("custom_model", "mlflow_model")
MODEL_OUTPUT_TYPES = ("uri_folder", "custom_model", "mlflow_model")
JOB_TYPES = ("Command", "Pipeline")


@dataclass(frozen=True)
class Slots:
    """Where a job body's inputs and outputs point."""

    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Input name -> (jobInputType, uri) for every asset input with a uri."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Output name -> uri for every output with a uri."""


def slots(body: dict[str, Any]) -> Slots:
    """The inputs and outputs of a job body (or template) that carry a `uri`."""
    props = as_object(body.get("properties"))
    found = Slots()
    for name, value in as_object(props.get("inputs")).items():
        if isinstance(value, dict) and isinstance(value.get("uri"), str):
            found.inputs[name] = (str(value.get("jobInputType")), value["uri"])
    for name, value in as_object(props.get("outputs")).items():
        if isinstance(value, dict) and isinstance(value.get("uri"), str):
            found.outputs[name] = value["uri"]
    return found


@dataclass(frozen=True)
class TemplateShape:
    """What a valid template declares: the input and output names of each placeholder."""

    training_input: str
    training_type: str
    """`uri_file` (one blob) or `uri_folder` (a folder of blobs)."""
    model_output: str
    champion_input: str | None


def check_template(template: Any) -> TemplateShape:
    """Check a template once (at configuration time): a job of a supported type whose inputs
    and outputs hold the placeholders where they belong; a UsageError names what is wrong."""
    if not isinstance(template, dict) or not isinstance(template.get("properties"), dict):
        raise UsageError('a job template is a JSON object with "properties" (a REST job body)')
    props = template["properties"]
    if props.get("jobType") not in JOB_TYPES:
        raise UsageError(
            f"job template: jobType must be one of {list(JOB_TYPES)}, got {props.get('jobType')!r}"
        )
    _check_names(template)
    outputs = {
        k: v.get("jobOutputType")
        for k, v in (props.get("outputs") or {}).items()
        if isinstance(v, dict) and v.get("uri") == "{retrain.model_output}"
    }
    inputs = {
        k: v.get("jobInputType")
        for k, v in (props.get("inputs") or {}).items()
        if isinstance(v, dict) and isinstance(v.get("uri"), str)
    }
    data = _one(inputs, "{retrain.training_data}", DATA_TYPES, template, "input")
    model_out = _only(outputs, "{retrain.model_output}", MODEL_OUTPUT_TYPES, "output")
    champions = {k: t for k, t in inputs.items() if _uri(props, k) == "{retrain.champion_model}"}
    champion = None
    if champions:
        champion = _only(champions, "{retrain.champion_model}", MODEL_INPUT_TYPES, "input")
    return TemplateShape(data, str(inputs[data]), model_out, champion)


def _uri(props: dict[str, Any], name: str) -> Any:
    return (props.get("inputs") or {})[name].get("uri")


def _one(
    inputs: dict[str, Any], marker: str, types: tuple[str, ...], template: Any, side: str
) -> str:
    props = template["properties"]
    matching = {k: t for k, t in inputs.items() if _uri(props, k) == marker}
    return _only(matching, marker, types, side)


def _only(matching: dict[str, Any], marker: str, types: tuple[str, ...], side: str) -> str:
    if len(matching) != 1:
        raise UsageError(
            f'job template: exactly one {side} must have "uri": "{marker}", found '
            f"{sorted(matching) or 'none'}"
        )
    name, kind = next(iter(matching.items()))
    if kind not in types:
        key = "jobInputType" if side == "input" else "jobOutputType"
        raise UsageError(f"job template: {side} {name!r} has {key} {kind!r}; use one of {types}")
    return name


def _check_names(value: Any) -> None:
    for text in _strings(value):
        for name in PLACEHOLDER.findall(text):
            if name not in KNOWN:
                raise UsageError(
                    f"job template: unknown placeholder {{retrain.{name}}}; known: "
                    + ", ".join(f"{{retrain.{k}}}" for k in sorted(KNOWN))
                )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_job(
    template: dict[str, Any],
    *,
    job_name: str,
    model: str,
    batch: str,
    training_data: str,
    model_output: str,
    champion_model: str | None,
) -> dict[str, Any]:
    """The job body: the template with its placeholders filled and the run's tags added."""
    shape = check_template(template)
    folder = shape.training_type == "uri_folder"
    if folder != training_data.endswith("/"):
        raise UsageError(
            f"training data {training_data!r} is a {'file' if not folder else 'folder'} URI but "
            f"input {shape.training_input!r} is {shape.training_type}"
        )
    body = copy.deepcopy(template)
    props = body["properties"]
    if champion_model is None and shape.champion_input is not None:
        del props["inputs"][shape.champion_input]
    values = {
        "training_data": training_data,
        "model_output": model_output,
        "champion_model": champion_model,
        "job_name": job_name,
        "model": model,
        "batch": batch,
    }
    filled = _fill(body, values)
    tags = filled["properties"].setdefault("tags", {})
    if not isinstance(tags, dict):
        raise UsageError("job template: tags must be a JSON object")
    tags.update({MODEL_TAG: model, RUN_TAG: batch})
    return filled  # type: ignore[no-any-return]


def _fill(value: Any, values: dict[str, str | None]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: _value(m.group(1), values), value)
    return value


def _value(name: str, values: dict[str, str | None]) -> str:
    value = values[name]
    if value is None:
        raise UsageError(
            f"job template: {{retrain.{name}}} is used outside its input, and there is no "
            "champion yet to fill it with"
        )
    return value
