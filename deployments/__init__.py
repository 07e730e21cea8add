"""Prefect deployments of the dbre flows: prefect.yaml for `prefect deploy`, serve.py for one process."""
