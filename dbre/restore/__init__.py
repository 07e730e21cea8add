"""Restore: plan which blobs a snapshot needs, then write them into a new file atomically."""
