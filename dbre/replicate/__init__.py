"""Continuous replication: WAL shipping into segments and transaction-precise point-in-time restore."""
