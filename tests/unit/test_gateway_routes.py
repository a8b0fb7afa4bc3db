"""The gateway's tricky cores without a server: template matching (verbs, percent-decoding),
405-vs-404, query/path conversion by field type, and the gRPC->HTTP status table."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from atelier_api.v1 import registry_pb2, training_pb2
from services.gateway.routes import compile_template, find_route, load_routes
from services.gateway.transcode import HTTP_STATUS, BadHttpRequest, build_request, http_status


def test_verbs_and_variables_do_not_swallow_each_other() -> None:
    names, pattern = compile_template("/v1/jobs/{id}:cancel")
    assert names == ("id",)
    assert pattern.fullmatch("/v1/jobs/j-1:cancel") and not pattern.fullmatch("/v1/jobs/j-1")
    routes = load_routes()
    route, bound, _ = find_route(routes, "GET", "/v1/jobs/j-1:watch")
    assert route is not None and route.method.name == "WatchTrainingJob" and bound == {"id": "j-1"}
    route, bound, _ = find_route(routes, "GET", "/v1/jobs/j-1")
    assert route is not None and route.method.name == "GetTrainingJob"
    route, bound, _ = find_route(routes, "GET", "/v1/base-models/tiny%402")
    assert route is not None and bound == {"name": "tiny@2"}


def test_a_known_path_with_another_method_is_told_apart_from_an_unknown_path() -> None:
    routes = load_routes()
    assert find_route(routes, "PATCH", "/v1/jobs")[0::2] == (None, True)
    assert find_route(routes, "GET", "/v1/nothing")[0::2] == (None, False)
    assert find_route(routes, "GET", "/v1/jobs/a/b")[0::2] == (None, False)  # a variable is one segment


def test_query_and_path_values_are_converted_by_field_type() -> None:
    request = build_request(registry_pb2.ExportAdapterRequest, None,
                            [("ref.version", "3"), ("format", "ADAPTER_FORMAT_KOHYA")], {"ref.name": "dog"})
    assert (request.ref.name, request.ref.version, request.format) == ("dog", 3, registry_pb2.ADAPTER_FORMAT_KOHYA)
    listed = build_request(training_pb2.ListTrainingJobsRequest, None, [("pageSize", "5")], {})
    assert listed.page_size == 5  # JSON names work as well as proto names
    with pytest.raises(BadHttpRequest, match="not a number"):
        build_request(training_pb2.ListTrainingJobsRequest, None, [("page_size", "five")], {})
    with pytest.raises(BadHttpRequest, match="unknown parameter"):
        build_request(training_pb2.ListTrainingJobsRequest, None, [("colour", "red")], {})
    with pytest.raises(BadHttpRequest, match="is a message"):
        build_request(registry_pb2.GetAdapterRequest, None, [("ref", "x")], {})
    with pytest.raises(BadHttpRequest):
        build_request(training_pb2.ListTrainingJobsRequest, None, [("state", "NOT_A_STATE")], {})


def _status(code: grpc.StatusCode, *details: error_details_pb2.PreconditionFailure) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0])
    for detail in details:
        status.details.add().Pack(detail)
    return status


def test_status_mapping_is_google_table_with_412_for_compare_and_swap() -> None:
    assert http_status(_status(grpc.StatusCode.NOT_FOUND)) == 404
    assert http_status(_status(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 429
    assert http_status(_status(grpc.StatusCode.UNAVAILABLE)) == 503
    conflict = error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(type="CONFLICT")])
    state = error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(type="STATE")])
    assert http_status(_status(grpc.StatusCode.FAILED_PRECONDITION, conflict)) == 412
    assert http_status(_status(grpc.StatusCode.FAILED_PRECONDITION, state)) == 400
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
