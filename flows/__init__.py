"""Prefect flows: one module per workflow, each only sequencing tasks and publishing artifacts.

backup (one database, then offsite copy), fleet (many databases under a concurrency limit; the
hourly and nightly deployments), restore (on demand, a form in the UI), verify (weekly integrity
validation), retention (forget and prune). Drill and requirements-report flows join as modules
of their own, with the same shape: settings from the policy (tasks/ and flows/common.py), tasks
for the work, artifacts at the end.
"""
