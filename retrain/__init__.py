"""Event-driven retraining of Azure ML web services: ingest, train through BES, gate, promote."""
