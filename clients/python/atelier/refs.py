"""Parse the adapter references people type: `name`, `name@3`, `name:alias`, `name@3=0.8`."""

from __future__ import annotations

from atelier import ids
from atelier_api.v1 import common_pb2, inference_pb2


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


# What names one adapter (registry calls) ...
AdapterLike = str | common_pb2.AdapterVersion | common_pb2.Adapter
# ... and what `generate(adapters=[...])` takes: an adapter with an optional weight. The server's
# parsed form of one such entry is services.inference.types.AdapterSpec (a different layer).
WeightedAdapterLike = AdapterLike | tuple[AdapterLike, float] | inference_pb2.AdapterWeight


def to_adapter_weights(adapters: list[WeightedAdapterLike] | None) -> list[inference_pb2.AdapterWeight]:
    """Accept strings (`"dog@2=0.8"`), AdapterVersion/Adapter objects (weight 1), (ref or
    object, weight) pairs or ready protos; anything else is a TypeError naming the item."""
    result = []
    for i, item in enumerate(adapters or []):
        param = f"adapters[{i}]"
        if isinstance(item, inference_pb2.AdapterWeight):
            result.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            if not isinstance(item[1], int | float) or isinstance(item[1], bool):
                raise TypeError(f"{param} weight must be a number, got {type(item[1]).__name__}")
            ref = parse_ref(ids.adapter_ref(item[0], param))
            result.append(inference_pb2.AdapterWeight(ref=ref, weight=float(item[1])))
        elif isinstance(item, str):
            result.append(parse_weighted(item))
        else:
            ref = parse_ref(ids.adapter_ref(item, param))  # AdapterVersion / Adapter, or TypeError
            result.append(inference_pb2.AdapterWeight(ref=ref, weight=1.0))
    return result


ROUTING_HEADER = "x-atelier-adapters"


def routing_value(adapters: list[inference_pb2.AdapterWeight]) -> str:
    """Sorted, comma-separated refs: the same adapter set hashes to the same replica."""
    return ",".join(sorted(format_ref(a.ref) for a in adapters))
