"""Reading infra/*.bicep through pycep's parse tree: expressions back to text, app settings,
role assignments."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from pycep import BicepParser

INFRA = Path(__file__).resolve().parents[2] / "infra"


@functools.cache
def template(name: str) -> dict[str, Any]:
    """The parse tree of infra/<name> (raises on anything the parser cannot read)."""
    parsed: dict[str, Any] = BicepParser().parse(file_path=INFRA / name)
    return parsed


def text(expr: Any) -> str:
    """An expression as Bicep-like text: `identity.properties.clientId`, `union(a, b)`."""
    if isinstance(expr, dict) and "operator" in expr:
        op = expr["operator"]
        ops = op["operands"]
        if op["type"] == "property_accessor":
            return f"{text(ops['operand_1'])}.{text(ops['operand_2'])}"
        if op["type"] == "index_accessor":
            return f"{text(ops['operand_1'])}[{text(ops['operand_2'])}]"
        return f"{op['type']}({', '.join(text(v) for v in ops.values())})"
    if isinstance(expr, dict) and "function" in expr:
        fn = expr["function"]
        args = ", ".join(text(v) for v in fn["parameters"].values() if v is not None)
        return f"{fn['type']}({args})"
    return str(expr)


def resources(name: str, rtype: str) -> dict[str, dict[str, Any]]:
    """The resources of one type in a template, by symbolic name, as (loop-free) configs."""
    found = {}
    for symbol, res in template(name)["resources"].items():
        if res["type"] == rtype:
            config = res["config"]
            while "config" in config and ("condition" in config or "loop_type" in config):
                config = config["config"]
            found[symbol] = config
    return found


def condition(name: str, symbol: str) -> str | None:
    """The `if (...)` of a resource, as text, or None."""
    config = template(name)["resources"][symbol]["config"]
    cond = config.get("condition")
    return None if cond is None else text(cond)


def _object_keys(tree: dict[str, Any], expr: Any) -> dict[str, Any]:
    """Keys and values of an object expression, following variables, union() and `c ? a : b`."""
    if isinstance(expr, dict) and "function" in expr and expr["function"]["type"] == "union":
        merged: dict[str, Any] = {}
        for arg in expr["function"]["parameters"].values():
            merged.update(_object_keys(tree, arg))
        return merged
    if isinstance(expr, dict) and "operator" in expr and expr["operator"]["type"] == "conditional":
        ops = expr["operator"]["operands"]
        return {**_object_keys(tree, ops["true_value"]), **_object_keys(tree, ops["false_value"])}
    if isinstance(expr, str) and expr in tree.get("variables", {}):
        return _object_keys(tree, tree["variables"][expr]["value"])
    if isinstance(expr, dict) and "operator" not in expr and "function" not in expr:
        return dict(expr)
    return {}  # a parameter (e.g. keyVaultReferences): its keys are the deployer's


def app_settings() -> dict[str, Any]:
    """Every app setting main.bicep can write (conditional ones included), name -> expression."""
    tree = template("main.bicep")
    (config,) = resources("main.bicep", "Microsoft.Web/sites/config").values()
    assert config["name"] == "appsettings"
    return _object_keys(tree, config["properties"])


GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def role_guid(name: str, assignment: dict[str, Any]) -> str:
    """The role definition GUID of a role assignment (a literal, or a parameter's default)."""
    fn = assignment["properties"]["roleDefinitionId"]["function"]
    assert fn["type"] == "subscription_resource_id"
    assert fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    guid = fn["parameters"]["resource_name_1"]
    params = template(name).get("parameters", {})
    if guid in params:
        guid = params[guid]["default"]
    assert GUID.match(guid), f"{name}: {guid!r} is not a role definition GUID"
    return str(guid)
