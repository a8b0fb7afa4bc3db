"""Warm start: adapters a replica loads (and pins) before its health check says SERVING.

Settings `preload_adapters` and `pinned_adapters` are comma-separated references of the form

    BASE_MODEL/TENANT/NAME            the newest version
    BASE_MODEL/TENANT/NAME@VERSION    one version
    BASE_MODEL/TENANT/NAME:ALIAS      whatever the alias points at when the replica starts

(names never contain '/', '@' or ':', so the form is unambiguous). Preloads go through every
tier into the device tier in order; ones the device tier cannot hold at once stay warm in the
host and disk tiers. Pins are attached and pinned (services/inference/cache.py): never evicted,
counted against the device tier's bounds. An alias pins the version it resolved to at start-up.
Any failure (bad reference, unknown adapter, a pin that does not fit) fails start-up with the
setting and the reference named: a replica that cannot hold its pins must not take traffic.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import AtelierError, FailedPrecondition, InvalidInput, ResourceExhausted
from services.inference.types import AdapterSpec
from services.registry.refs import TEXT_FORM, AdapterRef

if TYPE_CHECKING:
    from services.inference.engine import InferenceEngine

log = logging.getLogger(__name__)

_REF = re.compile(r"(?P<base>[a-z0-9][a-z0-9\-_.]{0,62}(?:@\d+)?)/(?P<tenant>[^/@:\s]+)/(?P<ref>\S+)")


@dataclass(frozen=True)
class WarmRef:
    raw: str
    base_model: str
    spec: AdapterSpec  # spec.ref: the adapter reference, in the setting's tenant


def parse_refs(text: str, setting: str) -> list[WarmRef]:
    """Parse one setting's value; InvalidInput names the setting and the bad entry."""
    refs = []
    for i, raw in enumerate(part.strip() for part in text.split(",")):
        if raw:
            base, ref = _parse_one(raw, setting)
            refs.append(WarmRef(raw, base, AdapterSpec(ref, 1.0, f"{setting}[{i}]")))
    return refs


def _parse_one(raw: str, setting: str) -> tuple[str, AdapterRef]:
    """(base model, adapter reference) of BASE_MODEL/TENANT/NAME[@VERSION|:ALIAS]."""
    bad = InvalidInput(setting, f"{raw!r} is not BASE_MODEL/TENANT/{TEXT_FORM}")
    match = _REF.fullmatch(raw)
    if match is None:
        raise bad
    try:
        return match["base"], AdapterRef.parse(match["ref"], match["tenant"], setting)
    except InvalidInput:
        raise bad from None


async def warm_start(engine: InferenceEngine) -> None:
    """Pin, then preload, everything the settings name (see the module docstring)."""
    settings = engine.settings
    preloads = parse_refs(settings.preload_adapters, "preload_adapters")
    pins = parse_refs(settings.pinned_adapters, "pinned_adapters")
    if not preloads and not pins:
        return
    started = time.perf_counter()
    for ref in pins:
        await _load(engine, ref, "pinned_adapters", pin=True)
    for ref in preloads:
        await _load(engine, ref, "preload_adapters", pin=False)
    log.info("warm start done", extra={"pinned": len(pins), "preloaded": len(preloads),
                                       "seconds": round(time.perf_counter() - started, 3)})


async def _load(engine: InferenceEngine, ref: WarmRef, setting: str, pin: bool) -> None:
    try:
        try:
            await engine.preload(ref.spec.ref.tenant, ref.base_model, [ref.spec], "device", pin=pin)
        except ResourceExhausted:
            if pin:
                raise
            # The pins leave no room: a preload still saves the download and the parse.
            log.warning("preload kept in the host tier (device tier full of pins)", extra={"ref": ref.raw})
            await engine.preload(ref.spec.ref.tenant, ref.base_model, [ref.spec], "host")
    except AtelierError as exc:
        raise FailedPrecondition(f"{setting}: cannot {'pin' if pin else 'preload'} {ref.raw}: {exc}",
                                 field_name=setting) from exc
