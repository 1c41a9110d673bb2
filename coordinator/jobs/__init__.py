"""Asynchronous jobs: the runner (items as background streams) and their SQLite store."""
