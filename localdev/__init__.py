"""Local development tools: the Azure ML emulator, the local runner and the demo."""
