"""Resilience suite (issue 4): faults and hostile input against real processes.

Run with `nox -s resilience` (or `pytest tests/resilience`); `pytest tests` skips it.
"""
