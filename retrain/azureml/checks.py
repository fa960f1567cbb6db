"""The Azure ML v2 setup check behind `python -m retrain check` and `preflight`: read-only GETs
showing that what a model spec names exists and lets the app in, before a run depends on it.

Training: the workspace answers with its `mlFlowTrackingUri` (spec §2); the MLflow tracking
server answers (a `runs/get` of a run no job has: 404, as OSS MLflow answers an unknown run);
every asset the job template references exists: each `codeId`, `environmentId`, `componentId`
and `computeId` anywhere in the body (a pipeline's steps too) is GET by its ARM id. Target: the
online endpoint exists and is `Succeeded` (§7.3 step 1) and the deployment template's assets
exist (the CLI then runs the target's own preflight, which reads its deployments and traffic
map; a first promotion runs only that, as its deploy lease allows for).

Each problem is a SetupError naming the setting, the resource and the fix (the `az ml ... show`
command that gives an id, the role the identity lacks), all of a section's problems in one
error. A service that does not answer stays the transient error it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from retrain.azureml.endpoints import BUSY, EndpointState, OnlineEndpoints
from retrain.azureml.lro import TERMINAL_FAILURES
from retrain.azureml.mlflow import MlflowRuns, rest_base
from retrain.azureml.spec import AzureMLSpec, OnlineEndpointSpec
from retrain.azureml.workspace import PROVIDER, ArmClient, WorkspaceRef, as_object
from retrain.errors import PermanentRemoteError, SetupError, TransientRemoteError

ASSET_KINDS = {
    "codeId": "codes",
    "environmentId": "environments",
    "componentId": "components",
    "computeId": "computes",
}
"""The keys of a job or deployment body that reference an asset, and the asset's ARM type."""
PROBE_RUN = "retrain-check-" + "0" * 32
"""A run id no job has: the MLflow check reads it and expects 404."""
_SHOW = {
    "codes": "az ml code show --name {name} --version {version}",
    "environments": "az ml environment show --name {name} --version {version}",
    "components": "az ml component show --name {name} --version {version}",
    "computes": "az ml compute show --name {name}",
}
_ASSET_ID = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    + re.escape(PROVIDER)
    + r"/workspaces/(?P<ws>[^/]+)/(?P<kind>[A-Za-z]+)/(?P<name>[^/]+)"
    r"(?:/versions/(?P<version>[^/]+))?",
    re.IGNORECASE,
)
_SHORT = re.compile(r"azureml:(?P<name>[^:@/]+)(?:[:@](?P<version>[^/]*))?")


@dataclass(frozen=True)
class AssetRef:
    """One asset reference in a template."""

    where: str
    """The setting and the path in it, e.g. `training.job_template properties.environmentId`."""
    key: str
    value: str

    @property
    def kind(self) -> str:
        """The ARM type the key references: codes, environments, components or computes."""
        return ASSET_KINDS[self.key]


def asset_refs(document: Any, setting: str) -> list[AssetRef]:
    """Every asset reference in a REST body (nested steps included), in document order."""
    found: list[AssetRef] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if key in ASSET_KINDS and isinstance(item, str):
                    found.append(AssetRef(f"{setting} {where}", key, item))
                else:
                    walk(item, where)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")

    walk(document, "")
    return found


def _show(kind: str, name: str, version: str | None, ws: str, rg: str) -> str:
    """The `az ml ... show` command of an asset (add `--query id` for its id)."""
    command = _SHOW[kind].format(name=name, version=version or "<version>")
    return f"{command} --workspace-name {ws} --resource-group {rg}"


@dataclass(frozen=True)
class _Parsed:
    kind: str
    name: str
    version: str | None
    workspace: str
    resource_group: str

    @property
    def label(self) -> str:
        return f"{self.kind[:-1]} {self.name}" + (
            f" version {self.version}" if self.version else ""
        )

    @property
    def show(self) -> str:
        return _show(self.kind, self.name, self.version, self.workspace, self.resource_group)


def _parse(ref: AssetRef, home: WorkspaceRef) -> _Parsed:
    """The parts of a referenced asset's ARM id; a SetupError when it is not one."""
    match = _ASSET_ID.fullmatch(ref.value)
    if match is None:
        short = _SHORT.fullmatch(ref.value)
        version = short["version"] if short else None
        name = short["name"] if short else "<name>"
        command = _show(
            ref.kind,
            name,
            None if version == "latest" else version,
            home.workspace,
            home.resource_group,
        )
        raise SetupError(
            f"{ref.where} is {ref.value!r}, not an ARM id: ARM resolves neither names, "
            f"'azureml:' short forms nor @latest; `{command} --query id` gives the id"
        )
    parsed = _Parsed(
        match["kind"].lower(), match["name"], match["version"], match["ws"], match["rg"]
    )
    if parsed.kind != ref.kind or (parsed.version is None) != (ref.kind == "computes"):
        form = "/<name>" if ref.kind == "computes" else "/<name>/versions/<version>"
        command = _show(ref.kind, parsed.name, None, parsed.workspace, parsed.resource_group)
        raise SetupError(
            f"{ref.where} is {ref.value!r}, not an id of the form <workspace id>/{ref.kind}"
            f"{form}; `{command} --query id` gives it"
        )
    return parsed


def check_asset(arm: ArmClient, ref: AssetRef) -> str:
    """GET one referenced asset by its ARM id; a fact, or a SetupError saying what to fix."""
    if ref.value.startswith("azureml://registries/"):
        return f"{ref.where}: registry asset {ref.value} (not checked: it is not in a workspace)"
    if "{retrain." in ref.value:
        return f"{ref.where}: filled per run (not checked)"
    asset = _parse(ref, arm.workspace)
    scope = f"workspace {asset.workspace} (resource group {asset.resource_group})"
    try:
        body = arm.get_json(arm.resource_url(ref.value), f"GET {asset.label}")
    except PermanentRemoteError as exc:
        fix = f"`{asset.show} --query id`"
        raise _refused(exc, f"{ref.where}: {asset.label}", scope, fix) from exc
    state = as_object(body.get("properties")).get("provisioningState")
    state = state if isinstance(state, str) else ""
    if asset.kind == "computes" and state.casefold() in (*TERMINAL_FAILURES, "deleting"):
        raise SetupError(
            f"{ref.where}: {asset.label} is {state}, so jobs cannot run on it: fix or re-create "
            f"it (`{asset.show}` shows its errors)"
        )
    return f"{ref.where}: {asset.label} exists" + (f" ({state})" if state else "")


def _refused(exc: PermanentRemoteError, what: str, scope: str, fix: str) -> Exception:
    """The SetupError a refused GET of a configured resource means, or `exc` itself."""
    if exc.status == 404:
        return SetupError(
            f"{what} does not exist in {scope} (HTTP 404); set the id of one that does: {fix} "
            "gives it",
            status=404,
        )
    if exc.status == 403:
        return SetupError(
            f"{what}: the app's identity may not read it (HTTP 403): it needs the 'AzureML Data "
            f"Scientist' role (or Contributor) on {scope}",
            status=403,
        )
    if exc.status == 401:
        return SetupError(f"{what}: {exc}", status=401)
    return exc


def _assets(arm: ArmClient, refs: list[AssetRef], facts: list[str], problems: list[str]) -> None:
    seen: set[str] = set()
    for ref in refs:
        if ref.value in seen:
            continue
        seen.add(ref.value)
        try:
            facts.append(check_asset(arm, ref))
        except SetupError as exc:
            problems.append(str(exc))


def _workspace(arm: ArmClient, section: str) -> tuple[str, str | None]:
    """GET the workspace: its MLflow tracking URI and location."""
    ref: WorkspaceRef = arm.workspace
    what = f"GET workspace {ref.workspace}"
    scope = f"resource group {ref.resource_group} of subscription {ref.subscription_id}"
    fix = (
        f"`az ml workspace show --name {ref.workspace} --resource-group {ref.resource_group} "
        f"--subscription {ref.subscription_id} --query id` shows whether it is there "
        f"({section}.subscription_id, resource_group, workspace)"
    )
    try:
        body = arm.get_json(arm.url(""), what)
    except PermanentRemoteError as exc:
        raise _refused(exc, f"{section}: workspace {ref.workspace}", scope, fix) from exc
    tracking = as_object(body.get("properties")).get("mlFlowTrackingUri")
    if not isinstance(tracking, str) or not tracking:
        raise SetupError(
            f"{section}: workspace {ref.workspace} answers without properties.mlFlowTrackingUri; "
            "the gate's metrics are read from the job's MLflow run, so the training workspace "
            "must be an Azure ML workspace with MLflow tracking"
        )
    location = body.get("location")
    return tracking, location if isinstance(location, str) else None


def _tracking(arm: ArmClient, tracking_uri: str) -> str:
    """The MLflow tracking server answers a read with the app's token."""
    try:
        base = rest_base(tracking_uri)
        MlflowRuns(arm, tracking_uri).run(PROBE_RUN)
    except PermanentRemoteError as exc:
        if exc.status == 404:
            return f"MLflow tracking answers at {base}"
        if exc.status in (401, 403):
            raise SetupError(
                f"MLflow tracking at {tracking_uri}: {exc}", status=exc.status
            ) from exc
        raise SetupError(
            f"MLflow tracking at {tracking_uri}: a runs/get of a run no job has should answer "
            f"404, got {exc}"
        ) from exc
    return f"MLflow tracking answers at {base}"


def check_training(arm: ArmClient, spec: AzureMLSpec) -> list[str]:
    """The training side: workspace, MLflow tracking, the job template's assets."""
    tracking, location = _workspace(arm, "training")
    where = f" in {location}" if location else ""
    facts = [f"workspace {arm.workspace.workspace}{where} answers with its mlFlowTrackingUri"]
    problems: list[str] = []
    try:
        facts.append(_tracking(arm, tracking))
    except SetupError as exc:
        problems.append(str(exc))
    _assets(arm, asset_refs(spec.job_template, "training.job_template"), facts, problems)
    if problems:
        raise SetupError("\n".join(problems))
    return facts


def _endpoint(arm: ArmClient, spec: OnlineEndpointSpec) -> EndpointState:
    ref = arm.workspace
    name = spec.endpoint
    scope = f"workspace {ref.workspace} (resource group {ref.resource_group})"
    fix = (
        f"`az ml online-endpoint show --name {name} --workspace-name {ref.workspace} "
        f"--resource-group {ref.resource_group} --query id` shows whether it is there "
        "(target.endpoint, target.workspace)"
    )
    try:
        return OnlineEndpoints(arm).endpoint(name)
    except PermanentRemoteError as exc:
        raise _refused(exc, f"target.endpoint: online endpoint {name}", scope, fix) from exc


def check_endpoint(arm: ArmClient, spec: OnlineEndpointSpec) -> list[str]:
    """The target side: the endpoint exists and is Succeeded; the deployment template's
    assets exist."""
    state = _endpoint(arm, spec)
    current = state.provisioning_state
    if current.casefold() in BUSY:
        raise TransientRemoteError(
            f"online endpoint {spec.endpoint} is {current}; check again once it is done"
        )
    facts: list[str] = []
    problems: list[str] = []
    if current.casefold() != "succeeded":
        problems.append(
            f"target.endpoint: online endpoint {spec.endpoint} is {current or 'in no state'}, not "
            "Succeeded, and a promotion changes only a Succeeded endpoint: `az ml online-endpoint "
            f"show --name {spec.endpoint}` shows why; fix or re-create it"
        )
    _assets(
        arm, asset_refs(spec.deployment_template, "target.deployment_template"), facts, problems
    )
    if problems:
        raise SetupError("\n".join(problems))
    return facts
