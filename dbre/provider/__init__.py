"""Restores from a provider's own point-in-time history instead of a dbre repository: a self-hosted
sqld's bottomless backups on S3 (`sqld`, a namespace fork at a time through its admin API) and Turso
Cloud's (`turso`, a new database seeded from a timestamp through the Platform API).

`plan` holds what both share (the `ProviderRestore` plan, the time window, the atomic file write);
`sqld` and `turso` each hold a small typed client and the steps of their restore."""

from __future__ import annotations

from dbre.provider.plan import PROVIDERS, ProviderRestore, ProviderResult

__all__ = ["PROVIDERS", "ProviderRestore", "ProviderResult"]
