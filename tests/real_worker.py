"""function_app.py as the Azure Functions Python worker sees it: its own indexing and invocation
logic (`azure-functions-runtime`, the worker's library for Python 3.13 and later), driven the
way the host drives it.

Run under Python 3.13 with the app's requirements, azure-functions 2.x (the release for 3.13)
and azure-functions-runtime (`make setup` builds `.venv-worker` where Python 3.13 is found):

    .venv-worker/bin/python tests/real_worker.py < request.json

The request names the app settings and the blob to deliver to `ingest`; the answer (stdout,
JSON) is what the worker returned: the init status, the functions it indexed with their raw
bindings, and the status of the invocation. `tests/test_real_worker.py` checks it.

The host speaks gRPC to the worker's proxy, which hands the runtime protobuf messages and the
module of their classes (`protos`). That module is not published on its own, so the messages
here are plain objects with the fields, oneof groups and enum values of the host's
FunctionRpc.proto that the runtime reads: what the runtime does with them is its own code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent


class Message:
    """A protobuf message as the runtime uses it: fields by keyword, `WhichOneof`. A field
    not given is not there (AttributeError), which the runtime relies on to tell a message from
    a field holding one."""

    ONEOFS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def WhichOneof(self, group: str) -> str | None:  # protobuf's own name
        return next((f for f in self.ONEOFS.get(group, ()) if f in self.__dict__), None)


def _message(name: str, oneofs: dict[str, tuple[str, ...]] | None = None, **enums: int) -> type:
    return type(name, (Message,), {"ONEOFS": oneofs or {}, **enums})


TYPED_DATA_FIELDS = (
    "string",
    "json",
    "bytes",
    "stream",
    "http",
    "int",
    "double",
    "collection_bytes",
    "collection_string",
    "collection_double",
    "collection_sint64",
    "model_binding_data",
    "collection_model_binding_data",
)
# Enum values of FunctionRpc.proto: BindingInfo.Direction (in, out, inout), BindingInfo.DataType
# (undefined, string, binary, stream), StatusResult.Status (Failure, Success, Cancelled).
protos = SimpleNamespace(
    StatusResult=_message("StatusResult", Failure=0, Success=1, Cancelled=2),
    BindingInfo=_message("BindingInfo", out=1, inout=2, undefined=0, string=1, binary=2, stream=3),
    TypedData=_message("TypedData", {"data": TYPED_DATA_FIELDS}),
    ModelBindingData=_message("ModelBindingData"),
    ParameterBinding=_message("ParameterBinding", {"rpc_data": ("data", "rpc_shared_memory")}),
    RpcFunctionMetadata=_message("RpcFunctionMetadata"),
    FunctionMetadataResponse=_message("FunctionMetadataResponse"),
    WorkerInitResponse=_message("WorkerInitResponse"),
    WorkerMetadata=_message("WorkerMetadata"),
    InvocationResponse=_message("InvocationResponse"),
    FunctionLoadResponse=_message("FunctionLoadResponse"),
    RpcException=_message("RpcException"),
    RpcRetryOptions=_message("RpcRetryOptions", fixed_delay=1, exponential_backoff=0),
)


def _request(properties: dict[str, Any] | None = None, **request: Any) -> Any:
    """What the proxy hands the runtime: the message (`.request`) and its properties."""
    return SimpleNamespace(request=SimpleNamespace(**request), properties=properties or {})


def _status(response: Any) -> dict[str, Any]:
    result = response.result
    failed = getattr(result, "exception", None)
    return {
        "status": {0: "Failure", 1: "Success", 2: "Cancelled"}[result.status],
        "exception": None if failed is None else failed.message,
    }


async def drive(ask: dict[str, Any]) -> dict[str, Any]:
    import azure_functions_runtime as runtime

    init = await runtime.worker_init_request(
        _request(
            {"host": "127.0.0.1", "protos": protos},
            worker_init_request=SimpleNamespace(capabilities={}, function_app_directory=str(ROOT)),
        )
    )
    answer: dict[str, Any] = {"init": _status(init)}
    if answer["init"]["status"] != "Success":
        return answer
    metadata = await runtime.functions_metadata_request(_request())
    functions = {f.name: f for f in metadata.function_metadata_results}
    answer["functions"] = {
        name: [json.loads(raw) for raw in f.raw_bindings] for name, f in functions.items()
    }
    runtime.start_threadpool_executor()
    try:
        blob = ask["blob"]
        reference = {
            "Connection": "AzureWebJobsStorage",
            "ContainerName": blob["container"],
            "BlobName": blob["name"],
        }
        invocation = await runtime.invocation_request(
            _request(
                invocation_request=SimpleNamespace(
                    invocation_id=str(uuid.uuid4()),
                    function_id=functions["ingest"].function_id,
                    input_data=[
                        protos.ParameterBinding(
                            name="blob",
                            data=protos.TypedData(
                                model_binding_data=protos.ModelBindingData(
                                    version="1.0",
                                    source="AzureStorageBlobs",
                                    content_type="application/json",
                                    content=json.dumps(reference),
                                )
                            ),
                        )
                    ],
                    trigger_metadata={
                        "BlobTrigger": protos.TypedData(
                            string=f"{blob['container']}/{blob['name']}"
                        ),
                        "name": protos.TypedData(string=blob["name"]),
                    },
                    trace_context=SimpleNamespace(trace_parent="", trace_state="", attributes={}),
                    retry_context=SimpleNamespace(retry_count=0, max_retry_count=0, exception=None),
                )
            )
        )
    finally:
        runtime.stop_threadpool_executor()
    answer["ingest"] = _status(invocation)
    return answer


def main() -> None:
    ask = json.load(sys.stdin)
    os.environ.update(ask["settings"])
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    print(json.dumps(asyncio.run(drive(ask))))


if __name__ == "__main__":
    main()
