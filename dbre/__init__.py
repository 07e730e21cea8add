"""dbre: backup and disaster recovery for libSQL, Turso and SQLite databases."""

__version__ = "0.1.0"
