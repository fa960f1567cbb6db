"""Azure ML v2 (Microsoft.MachineLearningServices) over ARM REST: jobs, MLflow metrics, model
registry and managed online endpoints, and the model spec sections that configure them. The
adapters over these clients are retrain/backends/azureml.py and
retrain/targets/online_endpoint.py."""
