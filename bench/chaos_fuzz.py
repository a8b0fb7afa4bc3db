"""R6 fuzzed requests: Hypothesis strategies built from the proto descriptors, sent to real servers.

Every service in protos/atelier/v1 is walked through its generated `*_pb2` module, so a new
RPC or field is fuzzed without touching this file. Values aim at the edges validation tends
to miss: unicode and huge strings, integers at their type's limits, NaN/inf/negative floats,
random bytes, unknown enum numbers, random oneof choices, nested messages, and (for
client-streaming RPCs) streams of random chunks. A call passes when its status is one the API
promises for bad input (never INTERNAL or UNKNOWN), the server still answers health SERVING,
and a rejected call that could create something left every listing as it was.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atelier_api.v1 import inference_pb2, registry_pb2, training_pb2, usage_pb2

MODULES = (training_pb2, registry_pb2, inference_pb2, usage_pb2)
ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})
# RPCs whose success stores something: a rejected call to one of them must leave the listings as they were.
CREATORS = frozenset({"UploadDataset", "CreateTrainingJob", "ImportAdapter", "ImportBaseModel", "SetAlias"})
MAX_DEPTH = 3
STREAM_MESSAGES = 4
HUGE = 200_000
CALL_DEADLINE_S = 5.0

_INT_LIMITS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def all_methods() -> list[MethodDescriptor]:
    """Every RPC of every service in the generated modules, in a stable order."""
    return [method for module in MODULES for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods]


def _integers(kind: int) -> st.SearchStrategy[int]:
    low, high = _INT_LIMITS[kind]
    edges = [low, high, 0, 1, -1 if low < 0 else 2, 7, 64, 1024, 10**6]
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))


def _strings() -> st.SearchStrategy[str]:
    plain = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
    names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True)
    special = st.sampled_from(["", " ", "a" * HUGE, "é" * 5000, "../../etc/passwd", "a/b", "\x00", "latest",
                               "@1", "x@-1", "x@99999999999999999999", "<tok>", "🎨" * 300, "tiny", "default"])
    return st.one_of(plain, names, special)


def _floats() -> st.SearchStrategy[float]:
    edges = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e308, -1e308, 5e-324, 0.5])
    return st.one_of(edges, st.floats(allow_nan=True, allow_infinity=True))


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type in _INT_LIMITS:
        return _integers(fd.type)
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _floats() if fd.type == FieldDescriptor.TYPE_DOUBLE else _floats().map(_clamp_float32)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _strings()
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\0" * 70_000]))
    if fd.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"unhandled field type {fd.type} of {fd.full_name}")


def _clamp_float32(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        return value
    return max(-3.4e38, min(3.4e38, value))


def _value(fd: FieldDescriptor, depth: int, sparse: bool = False) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dicts(fd.message_type, depth + 1, sparse)
    return _scalar(fd)


@st.composite
def message_dicts(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0, sparse: bool = False) -> dict[str, Any]:
    """A dict of field name -> value (fields present at random; one member per oneof at most).

    `sparse` keeps about one field in five: the mutation merged into a valid template.
    """
    out: dict[str, Any] = {}
    if depth > MAX_DEPTH:
        return out
    for oneof in descriptor.oneofs:
        if oneof.fields and not _synthetic(oneof) and draw(st.integers(0, 4 if sparse else 1)) == 1:
            chosen = draw(st.sampled_from(list(oneof.fields)))
            out[chosen.name] = draw(_value(chosen, depth, sparse))
    for fd in descriptor.fields:
        if fd.containing_oneof is not None and not _synthetic(fd.containing_oneof):
            continue
        present = draw(st.integers(0, 4)) == 0 if sparse else draw(st.integers(0, 3)) > 0
        if not present:
            continue
        if _is_map(fd):
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            out[fd.name] = draw(st.dictionaries(_scalar(key_fd), _value(value_fd, depth, sparse), max_size=3))
        elif fd.is_repeated:
            out[fd.name] = draw(st.lists(_value(fd, depth, sparse), max_size=3))
        else:
            out[fd.name] = draw(_value(fd, depth, sparse))
    return out


def _synthetic(oneof: Any) -> bool:
    """proto3 `optional` fields are one-member synthetic oneofs: treat them as plain fields."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def build(descriptor: Descriptor, values: dict[str, Any]) -> Message:
    """The message for `values`; a value protobuf itself refuses (e.g. an out-of-range
    Timestamp) is dropped, since no client library could send it."""
    message = GetMessageClass(descriptor)()
    for name, value in values.items():
        fd = descriptor.fields_by_name[name]
        try:
            _assign(message, fd, value)
        except (ValueError, TypeError, OverflowError):
            message.ClearField(name)
    return message


def _assign(message: Message, fd: FieldDescriptor, value: Any) -> None:
    if _is_map(fd):
        target = getattr(message, fd.name)
        for key, item in value.items():
            if isinstance(item, dict):
                target[key].CopyFrom(build(fd.message_type.fields_by_name["value"].message_type, item))
            else:
                target[key] = item
    elif fd.is_repeated:
        target = getattr(message, fd.name)
        for item in value:
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                target.add().CopyFrom(build(fd.message_type, item))
            else:
                target.append(item)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, fd.name).CopyFrom(build(fd.message_type, value))
    else:
        setattr(message, fd.name, value)


def _mutated(template: Message, values: dict[str, Any]) -> Message:
    """`template` with a sparse random message merged in (set scalars replace, lists append)."""
    message = type(template)()
    message.CopyFrom(template)
    message.MergeFrom(build(template.DESCRIPTOR, values))
    return message


def requests_for(method: MethodDescriptor, templates: Sequence[Message] = ()) -> st.SearchStrategy[Any]:
    """One request message, or a list of them for a client-streaming RPC.

    With `templates` (valid requests, one per stream position for a streaming RPC), half of
    the examples are those valid requests with a few fields mutated, so the fuzz reaches past
    the first validation check into the domain code.
    """
    one = message_dicts(method.input_type).map(lambda values: build(method.input_type, values))
    wild = st.lists(one, max_size=STREAM_MESSAGES) if method.client_streaming else one
    if not templates:
        return wild
    sparse = message_dicts(method.input_type, sparse=True)
    mutated = st.lists(sparse, min_size=len(templates), max_size=len(templates)).map(
        lambda changes: [_mutated(t, c) for t, c in zip(templates, changes, strict=True)])
    tame = mutated if method.client_streaming else mutated.map(lambda msgs: msgs[0])
    return st.one_of(wild, tame)


@dataclass
class Outcome:
    """What the fuzzer saw for one RPC."""

    method: str
    codes: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # disallowed codes, leaks and half-stored writes


Caller = Callable[[Any], grpc.StatusCode]
Cleanup = Callable[[str, Message], None]  # (method name, unary response) after an OK answer


def caller(channel: grpc.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...],
           cleanup: Cleanup | None = None) -> Caller:
    """Send a request (or request list) to `method` and return the final status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = GetMessageClass(method.output_type)
    kwargs = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": out_cls.FromString}
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming
                                                                       else "unary")
    rpc = getattr(channel, kind)(path, **kwargs)

    def call(request: Any) -> grpc.StatusCode:
        payload = iter(request) if method.client_streaming else request
        try:
            if method.server_streaming:
                for index, _ in enumerate(rpc(payload, timeout=CALL_DEADLINE_S, metadata=metadata)):
                    if index >= 3:
                        break  # a valid Watch would stream until its job ends; three answers are enough
            else:
                response = rpc(payload, timeout=CALL_DEADLINE_S, metadata=metadata)
                if cleanup is not None:
                    cleanup(method.name, response)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    return call


def serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def fuzz_method(method: MethodDescriptor, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...],
                snapshot: Callable[[], object], examples: int, templates: Sequence[Message] = (),
                cleanup: Cleanup | None = None) -> Outcome:
    """Run `examples` Hypothesis examples against one RPC; never raises for a bad answer, records it."""
    outcome = Outcome(method.full_name)
    call = caller(channel, method, metadata, cleanup)
    creator = method.name in CREATORS

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=("explicit", "generate"))
    @given(requests_for(method, templates))
    def probe(request: Any) -> None:
        before = snapshot() if creator else None
        code = call(request)
        outcome.codes[code.name] += 1
        if code not in ALLOWED:
            outcome.bad.append(f"{code.name} for {_short(request)}")
        elif creator and code != grpc.StatusCode.OK and snapshot() != before:
            outcome.bad.append(f"{code.name} but something was stored: {_short(request)}")

    probe()
    return outcome


def _short(request: Any, limit: int = 300) -> str:
    text = repr(request)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class FuzzTarget:
    """Which channel serves a service: the training server or the inference server."""

    channels: dict[str, grpc.Channel]  # service full name -> channel


def run_fuzz(target: FuzzTarget, metadata: tuple[tuple[str, str], ...], snapshot: Callable[[], object],
             examples: int, templates: Mapping[str, Sequence[Message]] | None = None,
             cleanup: Cleanup | None = None) -> tuple[list[Outcome], float]:
    """Fuzz every RPC (templates by method name, see `requests_for`); returns the outcomes and
    the wall seconds spent."""
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    for method in all_methods():
        channel = target.channels[method.containing_service.full_name]
        outcome = fuzz_method(method, channel, metadata, snapshot, examples, (templates or {}).get(method.name, ()),
                              cleanup)
        if not serving(channel):
            outcome.bad.append("server not SERVING after fuzzing")
        outcomes.append(outcome)
    return outcomes, time.perf_counter() - start


def iter_bad(outcomes: list[Outcome]) -> Iterator[str]:
    for outcome in outcomes:
        for bad in outcome.bad:
            yield f"{outcome.method}: {bad}"
