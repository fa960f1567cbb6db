"""Azure ML v2 (Microsoft.MachineLearningServices) over ARM REST: jobs, MLflow metrics, model
registry and managed online endpoints. Self-contained clients; the pipeline does not use them
yet."""
