"""The cores behind aborting device work: split attention, the guard's hooks, the daemon device
thread and the latent-area limit (the gRPC behaviour is in tests/integration/test_inference_deadlines.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InvalidInput
from services.inference.abort import AbortGuard, BatchAborted, split_attention
from services.inference.device_thread import DeviceThread
from services.inference.types import GenerationRequest
from services.inference.validation import check_latent_area


class Item:
    def __init__(self, dead: bool = False) -> None:
        self.is_dead = dead

    def dead(self) -> bool:
        return self.is_dead


@pytest.mark.parametrize(("shape", "keys", "budget"), [
    ((4, 2, 512, 8), 512, 2**20),   # whole samples per part
    ((2, 2, 1024, 16), 77, 2**14),  # query blocks within a sample (cross-attention)
])
def test_split_attention_equals_one_call_bit_for_bit(shape: tuple[int, ...], keys: int, budget: int) -> None:
    torch.manual_seed(0)
    query = torch.randn(*shape).transpose(1, 2).contiguous().transpose(1, 2)  # diffusers' layout
    key = torch.randn(*shape[:-2], keys, shape[-1])
    value = torch.randn_like(key)
    checks: list[int] = []
    parts = split_attention(query, key, value, budget, lambda: checks.append(1), F.scaled_dot_product_attention)
    assert torch.equal(parts, F.scaled_dot_product_attention(query, key, value))
    assert len(checks) > 1


def test_split_attention_stops_at_the_first_failed_check() -> None:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise BatchAborted()

    q = torch.randn(1, 1, 4096, 8)
    with pytest.raises(BatchAborted):
        split_attention(q, q, q, 64 * 4096, check, F.scaled_dot_product_attention)
    assert len(calls) == 3


class Pipe:
    def __init__(self) -> None:
        self.components = {"unet": torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)),
                           "name": "not a module"}


def test_guard_aborts_inside_a_forward_once_every_item_is_dead() -> None:
    guard = AbortGuard()
    pipe = Pipe()
    guard.hook(pipe)
    guard.hook(pipe)  # idempotent
    unet = pipe.components["unet"]
    assert len(unet[0]._forward_pre_hooks) == 1
    items = [Item(), Item()]
    x = torch.zeros(1, 1, 2, 2)
    with guard.running(items):
        unet(x)
        items[0].is_dead = True
        unet(x)  # one request is still alive
        items[1].is_dead = True
        with pytest.raises(BatchAborted):
            unet(x)
    unet(x)  # disarmed: no batch, no abort
    assert guard.batch()[1] == ()


def test_guard_ignores_other_threads_and_stop_aborts_everything() -> None:
    guard = AbortGuard()
    pipe = Pipe()
    guard.hook(pipe)
    x = torch.zeros(1, 1, 2, 2)
    errors: list[BaseException] = []

    def elsewhere() -> None:  # not the armed thread
        try:
            pipe.components["unet"](x)
        except BaseException as exc:
            errors.append(exc)

    with guard.running([Item()]):
        guard.stop()
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        with pytest.raises(BatchAborted):
            pipe.components["unet"](x)
    assert not errors
    with pytest.raises(BatchAborted), guard.running([Item()]):
        pass  # a stopped guard refuses every later batch at its start


def test_device_thread_is_a_daemon_running_calls_in_order() -> None:
    device = DeviceThread("test-device")
    order: list[int] = []
    gate = threading.Event()
    first = device.submit(lambda: (gate.wait(5), order.append(1)))
    second = device.submit(order.append, 2)
    failing = device.submit(lambda: 1 / 0)
    assert device._thread.daemon
    gate.set()
    second.result(5)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert first.done() and order == [1, 2]
    device.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        device.submit(order.append, 3)


def test_device_thread_shutdown_cancels_queued_work_without_waiting_for_the_running_call() -> None:
    device = DeviceThread("test-device")
    release = threading.Event()
    running = device.submit(release.wait, 10)
    queued = device.submit(time.sleep, 0)
    time.sleep(0.05)
    started = time.monotonic()
    device.shutdown(wait=False, cancel_futures=True)
    assert not device.join(0.1)  # still inside the running call
    assert time.monotonic() - started < 1
    with pytest.raises(CancelledError):
        queued.result(1)
    release.set()
    assert running.result(5) is True
    assert device.join(5)


def request(width: int = 0, height: int = 0) -> GenerationRequest:
    return GenerationRequest(base_model="sd", prompt="p", width=width, height=height)


def test_latent_area_follows_the_vae_scale_factor() -> None:
    check_latent_area(request(2048, 2048), 2048, 2048, 8, 65536, "sd15")  # 256 x 256 latents
    check_latent_area(request(1024, 4096), 1024, 4096, 8, 65536, "sdxl")  # any shape of that area
    with pytest.raises(InvalidInput) as both:
        check_latent_area(request(2048, 2056), 2048, 2056, 8, 65536, "sd15")
    assert [v.field for v in both.value.violations] == ["spec.width", "spec.height"]
    assert "at most 65536 latent pixels" in str(both.value) and "2048x2048" in str(both.value)
    with pytest.raises(InvalidInput) as tiny:  # the same pixels are 16x the latents at factor 2
        check_latent_area(request(height=2048), 512, 2048, 2, 65536, "tiny")
    assert [v.field for v in tiny.value.violations] == ["spec.height"]
    assert "512x512" in str(tiny.value)
    with pytest.raises(InvalidInput) as default:  # neither side set: the base's own size is too big
        check_latent_area(request(), 1024, 1024, 2, 65536, "tiny")
    assert [v.field for v in default.value.violations] == ["spec.width", "spec.height"]


class DiesAfter:
    """A request that dies after `n` liveness checks (i.e. somewhere inside a forward)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def dead(self) -> bool:
        self.left -= 1
        return self.left < 0


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_guard_aborts_inside_vae_decode_and_encode(direction: str) -> None:
    from services.tinymodel.pipeline import make_vae

    vae = make_vae().eval()
    guard = AbortGuard()

    class VaePipe:
        components = {"vae": vae}

    guard.hook(VaePipe)
    counter = DiesAfter(10**9)
    with guard.running([counter]), torch.no_grad():
        (vae.decode(torch.zeros(1, 4, 16, 16)) if direction == "decode" else vae.encode(torch.zeros(1, 3, 32, 32)))
    checks = 10**9 - counter.left
    with pytest.raises(BatchAborted), guard.running([DiesAfter(checks // 2)]), torch.no_grad():
        (vae.decode(torch.zeros(1, 4, 16, 16)) if direction == "decode" else vae.encode(torch.zeros(1, 3, 32, 32)))
    assert checks > 10  # checked all the way through, not only at the start


def test_patched_sdpa_splits_only_on_the_armed_thread() -> None:
    from services.inference import abort

    guard = AbortGuard(chunk_elements=2**12)
    assert abort._original_sdpa is not None and F.scaled_dot_product_attention is not abort._original_sdpa
    q = torch.randn(1, 2, 256, 8)
    whole = abort._original_sdpa(q, q, q)
    assert torch.equal(F.scaled_dot_product_attention(q, q, q), whole)  # not armed: passes through
    with guard.running([Item()]):
        assert torch.equal(F.scaled_dot_product_attention(q, q, q), whole)
        mask = torch.zeros(256, 256, dtype=torch.bool).fill_(True)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, mask, scale=None), whole)  # masked: one call
    dying = DiesAfter(3)
    with pytest.raises(BatchAborted), guard.running([dying]):
        F.scaled_dot_product_attention(q, q, q)  # 131k scores in parts of 4k: dies part-way
