"""Shared pieces of the Azure ML v2 client tests."""

from __future__ import annotations

from retrain.arm import StaticToken
from retrain.azureml.workspace import ArmClient, WorkspaceRef
from retrain.http import make_session

ARM = "https://management.azure.com"
WS_PATH = (
    "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws"
)
WS = ARM + WS_PATH
API = {"api-version": "2025-09-01"}
TOKEN = {"Authorization": "Bearer tok"}


def arm(retries: int = 0) -> ArmClient:
    """A client of workspace `ws` with a fixed token; no retries unless asked."""
    return ArmClient(
        WorkspaceRef("sub", "rg", "ws", ARM),
        credential=StaticToken("tok"),
        session=make_session(total_retries=retries, backoff=0),
        timeout=(1, 1),
    )
