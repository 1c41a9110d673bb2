"""Serving: the scheduler's pure policy (policy.py) over its value types (streams.py), and the thin async
driver that runs it against a chain of workers (driver.py)."""
