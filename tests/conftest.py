"""Shared fixtures live in tests/fixtures/, one module per real component."""

import os

# Every diffusers/transformers load in the test process (reference pipelines included) takes the
# process-wide model-load lock, as the services' own loads do.
import services.common.model_loading  # noqa: F401

# The HTTP gateway of `atelier serve` defaults to port 8080. Tests that exercise it pick a free
# port; everything else (in-process runtimes and the `atelier serve` subprocesses, which inherit
# this environment) runs without it, so parallel test runs never fight over 8080.
os.environ.setdefault("ATELIER_HTTP_PORT", "0")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.grpc_servers",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
]
