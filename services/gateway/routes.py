"""HTTP routes derived from the `google.api.http` annotations of the compiled protos.

The annotations in protos/atelier/v1/*.proto are the only route list: `load_routes()` walks
every service of the generated `atelier.v1.*_pb2` modules, so a new annotated RPC is served
(and documented in /openapi.json) without touching the gateway. Templates follow
google/api/http.proto: literal segments, `{field.path}` variables bound to one segment, and
an optional `:verb` suffix. Variables never match `/` or `:` (resource names contain neither),
which keeps `/v1/jobs/{id}` apart from `/v1/jobs/{id}:cancel`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, MethodDescriptor
from google.protobuf.message import Message

import atelier_api.v1

VERBS = ("get", "put", "post", "delete", "patch")
_VARIABLE = re.compile(r"\{([a-zA-Z0-9_.]+)(?:=[^}]*)?\}")


@dataclass(frozen=True)
class Route:
    """One annotated RPC: how it is reached over HTTP and which messages it carries."""

    method: MethodDescriptor
    http_method: str  # upper case
    template: str
    body: str  # "" (no body), "*" or a top-level field name
    variables: tuple[str, ...]
    pattern: re.Pattern[str] = field(compare=False)

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def match(self, path: str) -> dict[str, str] | None:
        """The percent-decoded path variables when `path` fits this template, else None."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {name: unquote(found.group(f"v{i}")) for i, name in enumerate(self.variables)}


def compile_template(template: str) -> tuple[tuple[str, ...], re.Pattern[str]]:
    """Variables of a path template and the regex that matches it (one segment per variable)."""
    names: list[str] = []
    regex, pos = "", 0
    for found in _VARIABLE.finditer(template):
        regex += re.escape(template[pos:found.start()]) + f"(?P<v{len(names)}>[^/:]+)"
        names.append(found.group(1))
        pos = found.end()
    regex += re.escape(template[pos:])
    return tuple(names), re.compile(regex)


def _rule_routes(method: MethodDescriptor, rule: http_pb2.HttpRule) -> list[Route]:
    routes = []
    for verb in VERBS:
        template = getattr(rule, verb)
        if template:
            names, pattern = compile_template(template)
            routes.append(Route(method, verb.upper(), template, rule.body, names, pattern))
    for extra in rule.additional_bindings:
        routes.extend(_rule_routes(method, extra))
    return routes


def public_files() -> list[FileDescriptor]:
    """Every generated atelier.v1 proto file (discovered, so a new .proto needs no edit here)."""
    files = []
    for info in sorted(pkgutil.iter_modules(atelier_api.v1.__path__), key=lambda m: m.name):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"atelier_api.v1.{info.name}")
            files.append(module.DESCRIPTOR)
    return files


def load_routes(files: list[FileDescriptor] | None = None) -> list[Route]:
    """All annotated RPCs of `files` (default: every public proto), in declaration order."""
    routes: list[Route] = []
    for file in files if files is not None else public_files():
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if options.HasExtension(annotations_pb2.http):
                    routes.extend(_rule_routes(method, options.Extensions[annotations_pb2.http]))
    return routes


def find_route(routes: list[Route], http_method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
    """(route, variables, path_known): path_known tells a 405 (other method) from a 404."""
    path_known = False
    for route in routes:
        bound = route.match(path)
        if bound is None:
            continue
        path_known = True
        if route.http_method == http_method:
            return route, bound, True
    return None, {}, path_known


def field_by_path(message: Descriptor, dotted: str) -> list[FieldDescriptor] | None:
    """The chain of fields for `a.b.c` (proto or JSON names), or None when one is unknown."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = message
    for part in dotted.split("."):
        if current is None:
            return None
        found = current.fields_by_name.get(part) or next(
            (f for f in current.fields if f.json_name == part), None)
        if found is None:
            return None
        chain.append(found)
        current = found.message_type
    return chain
