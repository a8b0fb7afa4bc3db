"""Shared fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.grpc_servers",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
]
