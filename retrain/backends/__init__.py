"""Training backends: one adapter per service, each implementing `retrain.ports.TrainingBackend`."""
