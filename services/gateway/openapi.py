"""An OpenAPI 3.0 document built from the same routes and message descriptors the gateway serves.

Schemas follow the proto3 JSON mapping (the wire format of the gateway): lowerCamel property
names, 64-bit integers as strings, bytes as base64 strings, enums as their names, Timestamp
as date-time. Query parameters are the request's scalar fields not bound in the path, dotted
for nested messages (`ref.version`), which is what the gateway accepts.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.gateway.routes import Route
from services.gateway.uploads import UPLOADS

F = FieldDescriptor
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True},
}
STATUS_SCHEMA = {"type": "object", "properties": {
    "code": {"type": "integer", "format": "int32"}, "message": {"type": "string"},
    "details": {"type": "array", "items": {"$ref": "#/components/schemas/google.protobuf.Any"}}}}


class _Schemas:
    """components/schemas, filled on demand as messages are referenced."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"google.rpc.Status": STATUS_SCHEMA,
                                        "google.protobuf.Any": _WELL_KNOWN["google.protobuf.Any"]}

    @staticmethod
    def ref_status() -> dict[str, Any]:
        return {"$ref": "#/components/schemas/google.rpc.Status"}

    def ref(self, message: Descriptor) -> dict[str, Any]:
        name = message.full_name
        if name not in self.schemas:
            if name in _WELL_KNOWN:
                self.schemas[name] = _WELL_KNOWN[name]
            else:
                self.schemas[name] = {}  # placeholder against recursion
                self.schemas[name] = self._message(message)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, message: Descriptor) -> dict[str, Any]:
        props = {f.name: self.field(f) for f in message.fields}
        return {"type": "object", "properties": props}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.value(field.message_type.fields_by_name["value"])}
        value = self.value(field)
        return {"type": "array", "items": value} if field.is_repeated else value

    def value(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        if field.message_type is not None:
            return self.ref(field.message_type)
        return dict(_SCALARS[field.type])


def _query_parameters(schemas: _Schemas, message: Descriptor, bound: set[str], prefix: str = "",
                      depth: int = 0) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for field in message.fields:
        name = prefix + field.name
        if name in bound:
            continue
        nested = field.message_type
        if nested is not None and nested.full_name not in _WELL_KNOWN and not nested.GetOptions().map_entry:
            if depth < 2 and not field.is_repeated:
                params += _query_parameters(schemas, nested, bound, f"{name}.", depth + 1)
            continue
        params.append({"name": name, "in": "query", "required": False, "schema": schemas.field(field)})
    return params


def _upload_body(schemas: _Schemas, route: Route) -> dict[str, Any]:
    header = route.method.input_type.fields_by_name["header"].message_type
    assert header is not None, route.grpc_path  # every upload request has a `header` message
    props: dict[str, Any] = {f.name: schemas.field(f) for f in header.fields}
    props["file"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": props}}}}


def _operation(schemas: _Schemas, route: Route) -> dict[str, Any]:
    request, response = route.method.input_type, route.method.output_type
    variables = set(route.variables)
    op: dict[str, Any] = {
        "operationId": f"{route.method.containing_service.name}_{route.method.name}",
        "tags": [route.method.containing_service.name],
        "parameters": [{"name": v, "in": "path", "required": True, "schema": {"type": "string"}}
                       for v in route.variables],
        "responses": {"default": {"description": "google.rpc.Status",
                                  "content": {"application/json": {"schema": schemas.ref_status()}}}},
    }
    if route.client_streaming and request.full_name in UPLOADS:
        op["requestBody"] = _upload_body(schemas, route)
    elif route.body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schemas.ref(request)}}}
    else:
        op["parameters"] += _query_parameters(schemas, request, variables)
    if route.server_streaming and {"header", "chunk"} <= set(response.fields_by_name):
        content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    elif route.server_streaming:
        content = {"text/event-stream": {"schema": {"type": "string", "description":
                   "Server-Sent Events: `data:` " + response.full_name + " JSON, then `event: end` or `event: error`"}}}
        schemas.ref(response)
    else:
        content = {"application/json": {"schema": schemas.ref(response)}}
    op["responses"]["200"] = {"description": "OK", "content": content}
    return op


def build_openapi(routes: list[Route], title: str = "Atelier HTTP/JSON API", version: str = "v1") -> dict[str, Any]:
    """The document for `routes`: one operation per annotated RPC binding."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.template, {})[route.http_method.lower()] = _operation(schemas, route)
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version,
                 "description": "Generated at start-up from the google.api.http annotations of protos/atelier/v1."},
        "components": {"schemas": schemas.schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An Atelier API key (when auth is on)."}}},
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }
