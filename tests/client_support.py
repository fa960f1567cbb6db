"""The service clients as the mocked-HTTP tests build them: BES, the Classic endpoint and the
New (ARM) web service, with the URLs, references and ARM definitions those tests share."""

from __future__ import annotations

from typing import Any

from retrain.arm import NewWebService, StaticToken
from retrain.bes import BesClient, BlobRef
from retrain.deploy import ClassicEndpoint
from retrain.http import make_session
from retrain.ports import ModelRef
from tests.fakes import blob_reader

JOBS = "https://ussouthcentral.services.azureml.net/workspaces/w/services/s/jobs"
EP = "https://management.azureml.net/workspaces/w/webservices/p/endpoints/prod"
REF = BlobRef("https://acct.blob.core.windows.net/", "c/in.csv", "?sv=1&sp=r&sig=SECRETSIG")

ARM = "https://management.azure.com"
ARM_URL = (
    f"{ARM}/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearning/webServices/ws"
)
MODEL = ModelRef("art", "m/r/model.ilearner")
NEW_URI = "https://acct.blob.core.windows.net/art/m/r/model.ilearner"


def bes() -> BesClient:
    """A BES client of JOBS with the key `the-key`, retrying without backoff."""
    return BesClient(JOBS, "the-key", session=make_session(backoff=0), timeout=(1, 1))


def classic() -> ClassicEndpoint:
    """The Classic endpoint EP with the key `ep-key`."""
    return ClassicEndpoint(
        EP,
        "ep-key",
        "M [trained model]",
        read=blob_reader(),
        session=make_session(backoff=0),
        timeout=(1, 1),
    )


def new_web_service(asset_name: str | None = None) -> NewWebService:
    """The New web service at ARM_URL, with the token `tok`."""
    return NewWebService(
        arm_endpoint=ARM,
        subscription_id="s",
        resource_group="rg",
        name="ws",
        asset_name=asset_name,
        api_version="2017-01-01",
        credential=StaticToken("tok"),
        read=blob_reader(),
        session=make_session(backoff=0),
        timeout=(1, 1),
    )


def definition(
    uri: str = "https://acct.blob.core.windows.net/old.ilearner",
    state: str = "Succeeded",
    **props: Any,
) -> dict[str, Any]:
    """A New web service as ARM GET returns it: a module and one trained-model asset at `uri`."""
    return {
        "id": "x",
        "name": "ws",
        "location": "South Central US",
        "properties": {
            "packageType": "Graph",
            "provisioningState": state,
            "readOnly": False,
            "assets": {
                "mod": {
                    "name": "Score Model",
                    "type": "Module",
                    "locationInfo": {"uri": "aml://m"},
                },
                "tm": {
                    "name": "Census Model [trained model]",
                    "type": "Resource",
                    "locationInfo": {"uri": uri},
                    "outputPorts": {"Results dataset": {}},
                },
            },
            **props,
        },
    }
