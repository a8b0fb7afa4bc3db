"""Batcher: admission bound, batching by key in arrival order, dead requests dropped."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from services.inference.batcher import Batcher, WorkItem
from services.inference.metrics import InferenceMetrics
from services.inference.runner import image_seeds
from services.inference.types import GenerationRequest


class Recorder:
    """An executor that records batches and finishes them after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay

    async def __call__(self, batch: list[WorkItem]) -> None:
        self.batches.append([item.payload for item in batch])
        await asyncio.sleep(self.delay)
        for item in batch:
            if not item.future.done():
                item.future.set_result(item.payload)


def make(capacity: int = 8, max_batch: int = 3, wait: float = 0.05, delay: float = 0.0) -> tuple[Batcher, Recorder]:
    recorder = Recorder(delay)
    return Batcher(capacity, max_batch, wait, recorder, InferenceMetrics(CollectorRegistry())), recorder


def item(key: str, name: str, deadline: float | None = None) -> WorkItem:
    return WorkItem((key,), name, asyncio.get_running_loop().create_future(), deadline)


def submit(batcher: Batcher, work: WorkItem) -> WorkItem:
    batcher.admit()
    batcher.submit(work)
    return work


async def _test_same_key_requests_share_a_batch_in_arrival_order() -> None:
    batcher, recorder = make()
    items = [submit(batcher, item(k, n)) for k, n in
             [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3"), ("a", "a4"), ("b", "b2")]]
    await asyncio.gather(*(i.future for i in items))
    assert recorder.batches == [["a1", "a2", "a3"], ["b1", "b2"], ["a4"]]
    assert batcher.depth == 0
    await batcher.close()


async def _test_full_queue_is_refused_immediately_and_slots_come_back() -> None:
    batcher, _recorder = make(capacity=2, max_batch=1, delay=0.2)
    first = submit(batcher, item("a", "1"))
    second = submit(batcher, item("a", "2"))
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as exc:
        batcher.admit()
    assert time.monotonic() - started < 0.01 and exc.value.retry_after_seconds > 0
    await first.future
    batcher.admit()  # a slot came back once the first request entered a batch
    batcher.release()
    await second.future
    await batcher.close()


async def _test_expired_and_withdrawn_requests_never_reach_the_device() -> None:
    batcher, recorder = make(wait=0.05)
    expired = submit(batcher, item("a", "expired", deadline=time.monotonic() - 1))
    withdrawn = submit(batcher, item("a", "withdrawn"))
    assert batcher.withdraw(withdrawn)
    cancelled = submit(batcher, item("a", "cancelled"))
    cancelled.cancelled.set()
    alive = submit(batcher, item("a", "alive"))
    assert await alive.future == "alive"
    with pytest.raises(DeadlineExceeded):
        await expired.future
    with pytest.raises(Cancelled):
        await cancelled.future
    assert recorder.batches == [["alive"]] and batcher.depth == 0
    await batcher.close()


def test_image_seeds_follow_the_contract() -> None:
    request = GenerationRequest("m", "p", num_images=3, seed=2**64 - 2)
    assert image_seeds(request) == [2**64 - 2, 2**64 - 1, 0]


def test_same_key_requests_share_a_batch_in_arrival_order() -> None:
    asyncio.run(_test_same_key_requests_share_a_batch_in_arrival_order())


def test_full_queue_is_refused_immediately_and_slots_come_back() -> None:
    asyncio.run(_test_full_queue_is_refused_immediately_and_slots_come_back())


def test_expired_and_withdrawn_requests_never_reach_the_device() -> None:
    asyncio.run(_test_expired_and_withdrawn_requests_never_reach_the_device())


def test_batch_key_covers_what_changes_the_pipeline_call_and_nothing_else() -> None:
    import torch

    from services.inference.adapters import AdapterKey
    from services.inference.device import AdapterUse
    from services.inference.engine import InferenceEngine
    from services.inference.merge_methods import MergeSpec
    from services.inference.payloads import LoraPayload
    from services.inference.pipelines import BaseModel
    from services.inference.runner import Job

    base = BaseModel("tiny", "d", None, "sd", torch.device("cpu"), torch.float32, None)

    def use(name: str, weight: float) -> AdapterUse:
        return AdapterUse(AdapterKey("t", name, 1, "x"), "LORA", weight, LoraPayload({}))

    def key(adapters: tuple[AdapterUse, ...] = (use("a", 1.0),), size: int = 32, **kw: object) -> tuple:  # type: ignore[type-arg]
        request = GenerationRequest("tiny", str(kw.pop("prompt", "p")), **kw)  # type: ignore[arg-type]
        return InferenceEngine._batch_key(Job(request, base, adapters, size, size))

    same = key()
    # prompt, negative prompt, seed and image count do not split a batch, nor (LINEAR merge:
    # per-sample deltas) which LoRAs and weights...
    assert key(prompt="other", negative_prompt="n", seed=9, num_images=3) == same
    assert key(adapters=(use("a", 0.5),)) == same == key(adapters=())
    assert key(adapters=(use("a", 1.0), use("b", 1.0))) == key(adapters=(use("b", 1.0), use("a", 1.0)))
    # ...but a full-rank TIES/DARE mix does (it batches only with the same mix)
    ties = MergeSpec("TIES", 0.5, 0)
    assert key(adapters=(use("a", 0.5),), merge=ties) != key(adapters=(use("a", 1.0),), merge=ties)
    assert key(adapters=(use("a", 0.5),), merge=ties) == key(adapters=(use("a", 0.5),), merge=ties)
    # ...as does a DreamBooth adapter, and size, steps, scheduler and guidance
    dreambooth = AdapterUse(AdapterKey("t", "db", 1, "x"), "DREAMBOOTH", 1.0, LoraPayload({}))
    assert key(adapters=(dreambooth,)) != same
    assert key(size=64) != same
    assert key(steps=10) != same
    assert key(scheduler="ddim") != same
    assert key(guidance_scale=3.0) != same


async def _test_companions_stay_within_the_adapter_bound() -> None:
    recorder = Recorder()
    batcher = Batcher(16, 8, 0.05, recorder, InferenceMetrics(CollectorRegistry()), max_adapters=3)
    sets = {"p": {"a"}, "q": {"b"}, "r": {"a", "c"}, "s": {"d"}, "t": {"b", "c"}, "u": set()}
    items = []
    for name, adapters in sets.items():
        work = item("k", name)
        work.adapters = frozenset(adapters)
        items.append(submit(batcher, work))
    await asyncio.gather(*(i.future for i in items))
    # {a, b, c} fills the bound: "s" (d) waits for the next batch, "u" (none) still fits.
    assert recorder.batches == [["p", "q", "r", "t", "u"], ["s"]]
    await batcher.close()


def test_companions_stay_within_the_adapter_bound() -> None:
    asyncio.run(_test_companions_stay_within_the_adapter_bound())


def tenant_item(tenant: str, key: str, name: str) -> WorkItem:
    return WorkItem((key,), name, asyncio.get_running_loop().create_future(), tenant=tenant)


async def _test_tenants_take_turns_whatever_their_backlog() -> None:
    batcher, recorder = make(max_batch=1, wait=0.0)
    flood = [submit(batcher, tenant_item("a", f"k{i}", f"a{i}")) for i in range(6)]
    trickle = [submit(batcher, tenant_item("b", "kb", f"b{i}")) for i in range(2)]
    await asyncio.gather(*(i.future for i in flood + trickle))
    order = [batch[0] for batch in recorder.batches]
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]
    await batcher.close()


async def _test_companions_are_shared_round_robin_across_tenants() -> None:
    batcher, recorder = make(max_batch=3, wait=0.0)
    items = [submit(batcher, tenant_item(t, "x", n)) for t, n in
             [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("a", "a4")]]
    await asyncio.gather(*(i.future for i in items))
    assert recorder.batches == [["a1", "b1", "c1"], ["a2", "a3", "a4"]]
    await batcher.close()


async def _test_a_backlogged_tenant_is_not_starved_by_one_at_a_time_tenants() -> None:
    batcher, recorder = make(max_batch=1, wait=0.0, delay=0.01)
    backlog = [submit(batcher, tenant_item("a", f"k{i}", f"a{i}")) for i in range(3)]

    async def one_at_a_time(tenant: str) -> None:
        for i in range(4):
            await submit(batcher, tenant_item(tenant, f"{tenant}{i}", f"{tenant}{i}")).future

    await asyncio.gather(one_at_a_time("b"), one_at_a_time("c"), *(i.future for i in backlog))
    order = [batch[0] for batch in recorder.batches]
    assert order.index("a2") < order.index("b3") and order.index("a2") < order.index("c3")
    await batcher.close()


def test_tenants_take_turns_whatever_their_backlog() -> None:
    asyncio.run(_test_tenants_take_turns_whatever_their_backlog())


def test_companions_are_shared_round_robin_across_tenants() -> None:
    asyncio.run(_test_companions_are_shared_round_robin_across_tenants())


def test_a_backlogged_tenant_is_not_starved_by_one_at_a_time_tenants() -> None:
    asyncio.run(_test_a_backlogged_tenant_is_not_starved_by_one_at_a_time_tenants())
