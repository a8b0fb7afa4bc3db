"""Parse the adapter references people type: `name`, `name@3`, `name:alias`, `name@3=0.8`."""

from __future__ import annotations

from atelier.v1 import common_pb2, inference_pb2


def parse_ref(text: str) -> common_pb2.AdapterRef:
    """`style` -> latest version, `style@3` -> version 3, `style:prod` -> alias `prod`."""
    text = text.strip()
    if "@" in text:
        name, _, version = text.partition("@")
        if not version.isdigit():
            raise ValueError(f"adapter version must be a number in {text!r}")
        return common_pb2.AdapterRef(name=name, version=int(version))
    if ":" in text:
        name, _, alias = text.partition(":")
        return common_pb2.AdapterRef(name=name, alias=alias)
    return common_pb2.AdapterRef(name=text)


def parse_weighted(text: str, default_weight: float = 1.0) -> inference_pb2.AdapterWeight:
    """`style@3=0.5` -> AdapterWeight(ref=style@3, weight=0.5)."""
    ref_text, sep, weight = text.rpartition("=") if "=" in text else (text, "", "")
    value = float(weight) if sep else default_weight
    return inference_pb2.AdapterWeight(ref=parse_ref(ref_text), weight=value)


def format_ref(ref: common_pb2.AdapterRef) -> str:
    """The inverse of parse_ref; also the form used in the routing header."""
    selector = ref.WhichOneof("selector")
    if selector == "version":
        return f"{ref.name}@{ref.version}"
    if selector == "alias":
        return f"{ref.name}:{ref.alias}"
    return ref.name


AdapterSpec = str | tuple[str, float] | inference_pb2.AdapterWeight


def to_adapter_weights(adapters: list[AdapterSpec] | None) -> list[inference_pb2.AdapterWeight]:
    """Accept strings (`"dog@2=0.8"`), (ref, weight) pairs or ready protos."""
    result = []
    for item in adapters or []:
        if isinstance(item, inference_pb2.AdapterWeight):
            result.append(item)
        elif isinstance(item, tuple):
            result.append(inference_pb2.AdapterWeight(ref=parse_ref(item[0]), weight=float(item[1])))
        else:
            result.append(parse_weighted(item))
    return result


ROUTING_HEADER = "x-atelier-adapters"


def routing_value(adapters: list[inference_pb2.AdapterWeight]) -> str:
    """Sorted, comma-separated refs: the same adapter set hashes to the same replica."""
    return ",".join(sorted(format_ref(a.ref) for a in adapters))
