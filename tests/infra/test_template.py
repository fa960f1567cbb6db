"""infra/: the Bicep template deploys what the app reads, key-less, with exactly the roles the
app identity needs. Checked offline on pycep's parse tree (`az bicep build` and `what-if` are the
checks to run where Azure is reachable; see README, Deploying to Azure)."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices, AliasPath

import function_app
from retrain.settings import Settings
from tests.infra.bicep import INFRA, app_settings, condition, resources, role_guid, template, text

ROOT = INFRA.parent
MAIN = "main.bicep"

# Built-in role definition ids (the same in every tenant), with the role each one is.
HOST_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "17d1049b-9a84-46fb-8f53-869881c3d3ab": "Storage Account Contributor",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
}
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
AZUREML_DATA_SCIENTIST = "f6c7c914-8db3-469d-8ca1-694a8f32e121"

# Settings the code reads that the template leaves unset on purpose, and why.
NOT_SET = {
    "RETRAIN_MODELS_FILE": "a path in the app's file system; the template writes RETRAIN_MODELS",
    "AzureWebJobsStorage__accountName": "an alternative to the __blobServiceUri and "
    "__queueServiceUri the template sets",
    "AzureWebJobsStorage__serviceUri": "an alternative (blob only) to __blobServiceUri",
}


def _alias_names(alias: object) -> set[str]:
    if isinstance(alias, str):
        return {alias}
    if isinstance(alias, AliasPath):
        return {str(alias.path[0])}
    if isinstance(alias, AliasChoices):
        return set().union(*(_alias_names(choice) for choice in alias.choices))
    return set()


def _environ_reads(source: str) -> set[str]:
    """Names read with os.environ.get / os.getenv / os.environ[...] in a module."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in {"os.environ.get", "os.getenv", "environ.get"}:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


@functools.cache
def bindings() -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """Each function's name and binding metadata, from a fresh import (get_functions() indexes
    an app once)."""
    app = importlib.reload(function_app).app
    return tuple(
        (fn.get_function_name(), tuple(b.get_dict_repr().items()))
        for fn in app.get_functions()
        for b in fn.get_bindings()
    )


def settings_the_code_reads() -> set[str]:
    """From Settings' aliases, function_app.py's environment reads and its binding metadata."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        names |= _alias_names(field.validation_alias)
    names |= _environ_reads(Path(function_app.__file__).read_text(encoding="utf-8"))
    for _, binding in bindings():
        for key, value in binding:
            if key == "connection":
                names.add(value)
            elif isinstance(value, str):
                names |= set(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)%", value))
    return names


def test_the_derived_list_is_the_real_one():
    """The derivation finds the settings named in settings.py, function_app.py and bindings."""
    names = settings_the_code_reads()
    assert {"AzureWebJobsStorage", "RETRAIN_MODELS", "RETRAIN_HTTP_READ_TIMEOUT"} <= names
    assert {"RETRAIN_INGEST_TRIGGER", "RETRAIN_BLOB_SOURCE", "RETRAIN_SWEEP_SCHEDULE"} <= names


def test_every_setting_the_code_reads_is_set():
    settings = app_settings()
    missing = []
    for name in sorted(settings_the_code_reads() - NOT_SET.keys()):
        identity_based = [key for key in settings if key.startswith(f"{name}__")]
        if name not in settings and not identity_based:
            missing.append(name)
    assert missing == [], f"infra/main.bicep sets no app setting {missing}"


def test_storage_connection_is_identity_based_on_the_user_assigned_identity():
    settings = app_settings()
    assert "AzureWebJobsStorage" not in settings  # a connection string would win over __ names
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    for service in ("blob", "queue", "table"):
        value = text(settings[f"AzureWebJobsStorage__{service}ServiceUri"])
        assert value == f"storage.properties.primaryEndpoints.{service}"
    client_id = "identity.properties.clientId"
    assert text(settings["AzureWebJobsStorage__clientId"]) == client_id
    assert text(settings["AZURE_CLIENT_ID"]) == client_id  # DefaultAzureCredential (ARM)
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        "ClientId=${identity.properties.clientId};Authorization=AAD"
    )


def test_the_app_runs_as_that_identity_and_no_other():
    identities = resources(MAIN, "Microsoft.ManagedIdentity/userAssignedIdentities")
    assert list(identities) == ["identity"]
    (app,) = resources(MAIN, "Microsoft.Web/sites").values()
    assert app["identity"] == {
        "type": "UserAssigned",
        "userAssignedIdentities": {"'${identity.id}'": {}},
    }
    props = app["properties"]
    auth = props["functionAppConfig"]["deployment"]["storage"]["authentication"]
    assert auth["type"] == "UserAssignedIdentity"
    assert text(auth["userAssignedIdentityResourceId"]) == "identity.id"
    assert text(props["keyVaultReferenceIdentity"]) == "identity.id"


def test_storage_account_takes_no_shared_key_and_only_https():
    (account,) = resources(MAIN, "Microsoft.Storage/storageAccounts").values()
    props = account["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False
    # 'stretrain' + uniqueString() (13 characters): within the 3-24 lower-case alphanumerics.
    prefix, rest = account["name"].split("${")
    assert rest == "suffix}"
    assert re.fullmatch(r"[a-z0-9]+", prefix)
    assert len(prefix) + 13 <= 24
    assert "toLower(uniqueString(" in Path(INFRA / MAIN).read_text(encoding="utf-8")


def test_containers_and_queues_are_the_ones_the_settings_name():
    settings = app_settings()
    tree = template(MAIN)
    containers = tree["variables"]["appContainers"]["value"]
    queues = tree["variables"]["dataQueues"]["value"]
    for setting in ("DATA", "ARTIFACTS", "STATE", "QUARANTINE"):
        assert settings[f"RETRAIN_{setting}_CONTAINER"] in containers
    for setting in ("JOBS", "EVALUATIONS", "EVENTS"):
        assert settings[f"RETRAIN_{setting}_QUEUE"] in queues
    loops = {
        symbol: tree["resources"][symbol]["config"]["loop_type"]["detail"]["array_name"]
        for symbol in ("containers", "queues")
    }
    assert loops == {"containers": "appContainers", "queues": "dataQueues"}
    # The defaults are the app's own defaults.
    params = tree["parameters"]
    for field, param in [
        ("artifacts_container", "artifactsContainerName"),
        ("state_container", "stateContainerName"),
        ("quarantine_container", "quarantineContainerName"),
        ("events_queue", "eventsQueueName"),
    ]:
        assert params[param]["default"] == Settings.model_fields[field].default


def test_model_specs_parameter_is_written_to_the_setting_the_app_reads():
    settings = app_settings()
    alias = Settings.model_fields["models_json"].validation_alias
    assert isinstance(alias, str)
    assert text(settings[alias]) == "string(modelSpecs)"
    assert template(MAIN)["parameters"]["modelSpecs"]["type"] == "array"


def test_flex_consumption_plan_python_311_with_memory_and_scale_as_parameters():
    (plan,) = resources(MAIN, "Microsoft.Web/serverfarms").values()
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    (app,) = resources(MAIN, "Microsoft.Web/sites").values()
    config = app["properties"]["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["scaleAndConcurrency"] == {
        "instanceMemoryMB": "instanceMemoryMB",
        "maximumInstanceCount": "maximumInstanceCount",
    }
    params = template(MAIN)["parameters"]
    assert params["instanceMemoryMB"]["type"] == "int"
    assert params["maximumInstanceCount"]["type"] == "int"
    assert app_settings()["RETRAIN_BLOB_SOURCE"] == "EventGrid"  # the only source on Flex


def _role_block(source: str, guid: str) -> str:
    match = re.search(rf"// ([^\n]+)\n\s*roleDefinitionId: [^\n]*'{guid}'", source)
    assert match, f"role {guid} has no comment naming it"
    return match.group(1)


def test_app_identity_gets_exactly_the_host_roles():
    assignments = resources(MAIN, "Microsoft.Authorization/roleAssignments")
    guids = {symbol: role_guid(MAIN, a) for symbol, a in assignments.items()}
    assert sorted(guids.values()) == sorted(HOST_ROLES)
    source = (INFRA / MAIN).read_text(encoding="utf-8")
    for symbol, assignment in assignments.items():
        guid = guids[symbol]
        assert _role_block(source, guid).startswith(HOST_ROLES[guid])
        assert text(assignment["properties"]["principalId"]) == "identity.properties.principalId"
        assert assignment["properties"]["principalType"] == "ServicePrincipal"
        expected_scope = "appInsights" if HOST_ROLES[guid].startswith("Monitoring") else "storage"
        assert assignment["scope"] == expected_scope
    # Storage Account Contributor is for the blob trigger only (Functions docs, host storage).
    by_role = {HOST_ROLES[g]: s for s, g in guids.items()}
    assert condition(MAIN, by_role["Storage Account Contributor"]) == "equals(ingestTrigger, blob)"
    assert all(
        condition(MAIN, s) is None for r, s in by_role.items() if r != "Storage Account Contributor"
    )


def test_target_roles_are_contributor_on_a_web_service_and_a_workspace_role():
    name = "target-role.bicep"
    assignments = resources(name, "Microsoft.Authorization/roleAssignments")
    assert role_guid(name, assignments["webServiceContributor"]) == CONTRIBUTOR
    assert _role_block((INFRA / name).read_text(encoding="utf-8"), CONTRIBUTOR) == "Contributor"
    # The workspace role comes from main.bicep's parameter, AzureML Data Scientist by default.
    workspace_role = assignments["workspaceRole"]["properties"]["roleDefinitionId"]
    assert text(workspace_role) == (
        "subscription_resource_id(Microsoft.Authorization/roleDefinitions, "
        "workspaceRoleDefinitionId)"
    )
    assert template(MAIN)["parameters"]["workspaceRoleDefinitionId"]["default"] == (
        AZUREML_DATA_SCIENTIST
    )
    assert assignments["webServiceContributor"]["scope"] == "webService"
    assert assignments["workspaceRole"]["scope"] == "workspace"
    module = template(MAIN)["modules"]["targetRoles"]
    assert module["detail"]["path"] == name
    assert module["config"]["loop_type"]["detail"]["array_name"] == "targetResourceIds"
    params = module["config"]["config"]["params"]
    assert text(params["principalId"]) == "identity.properties.principalId"
    assert params["workspaceRoleDefinitionId"] == "workspaceRoleDefinitionId"


FORBIDDEN = [
    r"listKeys",
    r"listAccountSas",
    r"listServiceSas",
    r"AccountKey\s*=",
    r"SharedAccessSignature",
    r"DefaultEndpointsProtocol",
    r"\bsig=",
    r"\.keys\[",
    r"primaryKey",
    r"InstrumentationKey\s*=",
]


def _infra_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    return [*files, ROOT / "azure.yaml"]


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_no_key_or_connection_string_anywhere(pattern):
    hits = [
        str(path.relative_to(ROOT))
        for path in _infra_files()
        if re.search(pattern, path.read_text(encoding="utf-8"), flags=re.IGNORECASE)
    ]
    assert hits == []


def test_the_only_connection_string_setting_is_app_insights_without_local_auth():
    settings = app_settings()
    named = [n for n in settings if re.search(r"CONNECTION|KEY|SECRET|TOKEN|PASSWORD", n)]
    assert sorted(named) == ["APPLICATIONINSIGHTS_CONNECTION_STRING", "RETRAIN_WEBHOOK_SECRET"]
    assert settings["RETRAIN_WEBHOOK_SECRET"].startswith("@Microsoft.KeyVault(SecretUri=")
    # The App Insights connection string locates the ingestion endpoint; with local auth off its
    # instrumentation key alone is refused, so it carries no credential.
    (insights,) = resources(MAIN, "Microsoft.Insights/components").values()
    assert insights["properties"]["DisableLocalAuth"] is True
    secure = [
        decorator["type"]
        for decorator in template("eventgrid-subscription.bicep")["parameters"]["blobsWebhookUrl"][
            "decorators"
        ]
    ]
    assert "secure" in secure


def test_event_grid_subscription_filters_blob_created_in_the_data_container():
    name = "eventgrid-subscription.bicep"
    (subscription,) = resources(
        name, "Microsoft.EventGrid/systemTopics/eventSubscriptions"
    ).values()
    event_filter = subscription["properties"]["filter"]
    assert event_filter["includedEventTypes"] == ["Microsoft.Storage.BlobCreated"]
    assert event_filter["subjectBeginsWith"] == (
        "/blobServices/default/containers/${dataContainerName}/blobs/"
    )
    # The same container the app's setting and main.bicep's output name.
    assert app_settings()["RETRAIN_DATA_CONTAINER"] == "dataContainerName"
    assert template(MAIN)["outputs"]["RETRAIN_DATA_CONTAINER"]["value"] == "dataContainerName"
    # Delivered to `ingest`: the blob trigger's webhook or the Event Grid trigger function.
    variables = template(name)["variables"]
    function = variables["functionDestination"]["value"]
    assert function["properties"]["resourceId"] == "${functionApp.id}/functions/ingest"
    assert variables["webhookDestination"]["value"]["endpointType"] == "WebHook"
    assert "ingest" in {name for name, _ in bindings()}
    (topic,) = resources(MAIN, "Microsoft.EventGrid/systemTopics").values()
    assert text(topic["properties"]["source"]) == "storage.id"
    assert topic["properties"]["topicType"] == "Microsoft.Storage.StorageAccounts"


def test_azd_deploys_the_function_app_from_this_template():
    config: dict[str, Any] = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert config["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    (service,) = config["services"].values()
    assert service == {"project": ".", "language": "python", "host": "function"}
    (app,) = resources(MAIN, "Microsoft.Web/sites").values()
    assert text(app["tags"]) == "union(tags, {'azd-service-name': 'retrain'})" or (
        "retrain" in str(app["tags"])
    )
    hook = ROOT / config["hooks"]["postdeploy"]["run"]
    assert hook.is_file()
    parameters = (INFRA / "main.parameters.json").read_text(encoding="utf-8")
    for param, spec in template(MAIN)["parameters"].items():
        if "default" not in spec:
            assert f'"{param}"' in parameters, f"azd has no value for required {param}"
