"""`python -m localdev.amlemu --config emulator.json --port 8765`."""

from localdev.amlemu.server import main

main()
