"""Atelier's wire contract: the Python stubs generated from protos/atelier/v1 (`atelier_api.v1`).

A distribution of its own (`atelier-api`, no torch) so the SDK and the servers share one copy of
the contract without depending on each other.
"""
