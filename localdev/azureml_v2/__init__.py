"""A strict local emulator of the Azure ML v2 contracts in ../shared/spec/azureml-v2-rest.md.

ARM jobs that really train on the input CSV read from Azurite (with the classic emulator's
learner, `localdev.learn`), an MLflow REST subset with the metrics each job logged, run history,
model versions, managed online endpoints and deployments with long-running operations, and
scoring by each deployment's registered model. It refuses what the service refuses, in the ARM
error shape, and records each refusal in `Emulator.violations`.

Run it: `python -m localdev.azureml_v2 --config v2.json --port 8766`.
"""

from localdev.azureml_v2.core import Emulator, Faults
from localdev.azureml_v2.server import EmulatorServer

__all__ = ["Emulator", "EmulatorServer", "Faults"]
