"""The SDK against a real `atelier serve`: upload -> train -> watch -> generate, sync and async.

(Retries against a refusing-then-recovering server and the routing header are covered by
tests/integration/test_sdk_retries.py; this file is the happy path and its typed errors.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from atelier import AsyncClient, Client, GenerationResult, InvalidArgumentError, NotFoundError
from atelier.demo_images import concept_images
from atelier_api.v1 import common_pb2, inference_pb2, training_pb2
from tests.e2e.conftest import BASE_MODEL, Services

pytestmark = pytest.mark.slow

TI_NAME = "sdk-ti"
TOKEN = "<disc>"
INITIALIZER = "circle"  # one token in the tiny tokenizer (services/tinymodel/words.py)
SMALL: dict[str, Any] = {"resolution": 32, "seed": 0}
Events = list[training_pb2.WatchTrainingJobResponse]


@pytest.fixture(scope="module")
def client(services: Services) -> Iterator[Client]:
    with Client(services.training_target, inference_target=services.inference_target, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def dataset_id(client: Client) -> str:
    dataset = client.upload_dataset(concept_images(4, seed=5, pattern="stripes"), name="sdk-disc",
                                    captions=["a photo of <disc>"] * 4)
    assert len(dataset.images) == 4 and all(image.width == 64 for image in dataset.images)
    return dataset.id


@pytest.fixture(scope="module")
def ti_events(client: Client, dataset_id: str) -> Events:
    handle = client.train("textual-inversion", base_model=BASE_MODEL, dataset=dataset_id, name=TI_NAME,
                          placeholder_token=TOKEN, initializer_token=INITIALIZER,
                          instance_prompt=f"a photo of {TOKEN}", max_train_steps=8, **SMALL)
    assert handle.job.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
    events = list(handle.watch(timeout=300))
    assert handle.wait(timeout=60).state == training_pb2.JOB_STATE_SUCCEEDED
    return events


def test_watch_events_have_increasing_steps(ti_events: Events) -> None:
    steps = [event.job.step for event in ti_events]
    assert steps == sorted(steps), steps
    assert len(set(steps)) >= 2 and steps[-1] == 8
    final = ti_events[-1]
    assert final.job.state == training_pb2.JOB_STATE_SUCCEEDED
    assert final.published.name == TI_NAME and final.published.version == 1
    assert any(event.loss > 0 for event in ti_events)


def test_generate_with_the_adapter(client: Client, ti_events: Events) -> None:
    result = client.generate(f"a photo of {TOKEN}", base_model=BASE_MODEL, adapters=[f"{TI_NAME}=1.0"],
                             seed=5, steps=4, width=32, height=32, num_images=2)
    assert len(result.images) == 2 and all(isinstance(image, Image.Image) for image in result.images)
    assert all(image.size == (32, 32) for image in result.images)
    assert result.seeds[0] == 5
    [resolved] = result.adapters
    assert (resolved.name, resolved.version, resolved.kind) == (TI_NAME, 1, common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION)
    assert resolved.manifest_digest and result.timings.total_ms > 0
    again = client.generate(f"a photo of {TOKEN}", base_model=BASE_MODEL, adapters=[(f"{TI_NAME}@1", 1.0)],
                            seed=5, steps=4, width=32, height=32)
    assert again.images[0].tobytes() == result.images[0].tobytes()  # pinned version + seed reproduce


def test_generate_stream_yields_progress_then_one_result(client: Client, ti_events: Events) -> None:
    events = list(client.generate_stream(f"a photo of {TOKEN}", base_model=BASE_MODEL, adapters=[TI_NAME],
                                         seed=3, steps=4, width=32, height=32))
    *progress, last = events
    assert isinstance(last, GenerationResult) and last.images[0].size == (32, 32)
    updates = [event for event in progress if isinstance(event, inference_pb2.GenerationProgress)]
    assert updates and len(updates) == len(progress)  # exactly one result, and it came last
    denoising = [event for event in updates if event.stage == "denoising"]
    steps = [event.step for event in denoising]
    # total_steps is the scheduler's count of model calls (PNDM takes one more than asked)
    assert steps == sorted(steps) and steps[-1] == denoising[-1].total_steps >= 4


def test_sdk_lists_jobs_and_adapters(client: Client, ti_events: Events) -> None:
    assert ti_events[-1].job.id in {job.id for job in client.jobs.list()}
    assert TI_NAME in {adapter.name for adapter in client.adapters.list()}
    [version] = list(client.adapters.versions(TI_NAME))
    assert version.kind == common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION and TOKEN in version.trigger_tokens
    assert client.adapters.set_alias(TI_NAME, "stable", 1).version == 1
    assert client.adapters.get(f"{TI_NAME}:stable").version.version == 1
    assert BASE_MODEL in {model.name for model in client.base_models.list()}


def test_field_violations_are_readable(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.generate("a photo", base_model=BASE_MODEL, width=33, height=32, steps=2)
    assert caught.value.field == "spec.width"
    assert any("multiple of 8" in v.description for v in caught.value.field_violations)
    with pytest.raises(NotFoundError) as missing:
        client.generate("a photo", base_model=BASE_MODEL, adapters=["nobody@3"], steps=2, width=32, height=32)
    assert "nobody" in missing.value.message


def test_cancel_a_running_job(client: Client, dataset_id: str) -> None:
    handle = client.train("lora", base_model=BASE_MODEL, dataset=dataset_id, name="sdk-cancelled",
                          instance_prompt="a photo of sks circle", max_train_steps=5000, **SMALL)
    for event in handle.watch(timeout=120):
        if event.job.state == training_pb2.JOB_STATE_RUNNING and event.job.step >= 1:
            break
    handle.cancel()
    assert handle.wait(timeout=120).state == training_pb2.JOB_STATE_CANCELLED
    with pytest.raises(NotFoundError):
        client.adapters.get("sdk-cancelled")


def test_async_client_train_wait_generate(services: Services, dataset_id: str) -> None:
    async def flow() -> tuple[training_pb2.TrainingJob, GenerationResult]:
        async with AsyncClient(services.training_target, inference_target=services.inference_target,
                               timeout=120) as sdk:
            dataset = await sdk.upload_dataset(concept_images(4, seed=9), name="async-disc")
            job = await sdk.train("lora", base_model=BASE_MODEL, dataset=dataset.id, name="async-lora",
                                  instance_prompt="a photo of sks circle", max_train_steps=4, rank=4, **SMALL)
            done = await sdk.wait(job.id, timeout=300)
            result = await sdk.generate("a photo of sks circle", base_model=BASE_MODEL, adapters=["async-lora=0.8"],
                                        seed=1, steps=3, width=32, height=32)
            return done, result

    job, result = asyncio.run(flow())
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.output.name == "async-lora"
    assert [(a.name, a.version, a.kind) for a in result.adapters] == [("async-lora", 1, common_pb2.ADAPTER_KIND_LORA)]
    assert result.images[0].size == (32, 32)
