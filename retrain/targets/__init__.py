"""Deploy targets beyond the classic ones (retrain/deploy.py, retrain/arm.py)."""
