"""`python -m localdev.azureml_v2`: serve the emulator."""

from localdev.azureml_v2.server import main

main()
