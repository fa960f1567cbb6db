"""A local emulator of Azure ML Studio (classic) BES v2.0 and endpoint management.

It follows the contracts in the REST spec (Bearer keys, api-version=2.0 on BES, PascalCase,
StatusCode names, `.ilearner` outputs, no PATCH of `default`) and really trains: it reads the
input through the reference it is given, fits a small model, writes the `.ilearner` and an
Evaluate Model CSV, and serves predictions from each endpoint's current model.

It is as strict as the spec and records what a client did wrong in `Emulator.violations`: a
second start (refused with 409), status polls of one job under 1 s apart, a second job on a blob
version an earlier job trained, and references that are not percent-encoded (refused the way
Azure Storage refuses them). `Emulator.trained` records what each job read.

One module per service, each with its route table of (method, path pattern, handler):

    bes.py      BES v2.0 jobs of a training web service
    classic.py  Classic endpoint management (GET, PATCH) and RRS scoring
    arm.py      New (ARM) web services: definition, PATCH with provisioning, operation status, RRS
    routes.py   the route table: Request, Reply, first-match dispatch
    common.py   shared state (faults, calls, violations), errors, references, scoring
    server.py   Emulator (the services and the /_emulator/ control routes), the HTTP layer
                (on `localdev.emuhttp`, shared with `localdev.azureml_v2`)

Run it: `python -m localdev.amlemu --config emulator.json --port 8765`.
"""

from localdev.amlemu.common import AUTH_FAILED, Faults
from localdev.amlemu.server import Emulator, EmulatorServer

__all__ = ["AUTH_FAILED", "Emulator", "EmulatorServer", "Faults"]
