"""Prefect tasks: thin, typed wrappers over dbre with retries on transient errors, timeouts and UI names.

Tasks take repository URLs and secret *references* (``env:NAME``, ``prefect-secret:BLOCK``) and
resolve them at run time (tasks/secrets.py), so no key or token travels through Prefect's
parameters or results; they return small summaries (dicts), never data.
"""
