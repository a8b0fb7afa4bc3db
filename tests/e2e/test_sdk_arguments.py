"""The SDK takes back the objects it returns wherever it asks for their id, against a real
`atelier serve`; any other type is a TypeError naming the parameter, before any request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from atelier import AsyncClient, Client, NotFoundError
from atelier.demo_images import concept_images
from atelier_api.v1 import common_pb2, training_pb2
from tests.e2e.conftest import BASE_MODEL, Services

pytestmark = pytest.mark.slow

SMALL: dict[str, Any] = {"resolution": 32, "seed": 0, "max_train_steps": 2, "rank": 4,
                         "instance_prompt": "a photo of sks circle"}


@pytest.fixture(scope="module")
def client(services: Services) -> Iterator[Client]:
    with Client(services.training_target, inference_target=services.inference_target, timeout=120) as sdk:
        yield sdk


def test_objects_the_sdk_returns_are_accepted_as_ids(client: Client) -> None:
    dataset = client.upload_dataset(concept_images(3, seed=11), name="args-ds")
    handle = client.train("lora", base_model=BASE_MODEL, dataset=dataset, name="args-lora", **SMALL)
    assert handle.job.spec.dataset_id == dataset.id
    assert client.jobs.get(handle).id == client.jobs.get(handle.job).id == handle.id
    assert handle.wait(timeout=300).state == training_pb2.JOB_STATE_SUCCEEDED
    [version] = list(client.adapters.versions("args-lora"))
    assert isinstance(version, common_pb2.AdapterVersion)
    assert client.adapters.get(version).version.version == version.version
    [adapter] = [a for a in client.adapters.list() if a.name == "args-lora"]
    assert list(client.adapters.versions(adapter)) == [version]
    client.adapters.set_alias(version, "prod")
    assert client.adapters.get("args-lora:prod").version.version == version.version
    for adapters in ([version], [(adapter, 0.5)]):  # this exact version; the latest, weighted
        result = client.generate("a photo of sks circle", base_model=BASE_MODEL, adapters=adapters,  # type: ignore[arg-type]
                                 seed=1, steps=2, width=32, height=32)
        assert [(a.name, a.version) for a in result.adapters] == [("args-lora", version.version)]
    client.adapters.delete_alias(version, "prod")
    client.adapters.delete(version)
    with pytest.raises(NotFoundError):
        client.adapters.get(version)


@pytest.mark.parametrize("call,param,expected", [
    (lambda c: c.train("lora", base_model=BASE_MODEL, dataset=["a.png"], name="x"), "dataset", "Dataset"),
    (lambda c: c.train("lora", base_model=BASE_MODEL, dataset=7, name="x"), "dataset", "dataset id (str)"),
    (lambda c: c.train("lora", base_model=None, dataset="ds-1", name="x"), "base_model", "a str"),
    (lambda c: c.jobs.get(42), "job_id", "TrainingJob"),
    (lambda c: c.adapters.get(3.5), "ref", "AdapterVersion"),
    (lambda c: c.adapters.delete("cat"), "version", "required unless name is an AdapterVersion"),
    (lambda c: c.adapters.set_alias(common_pb2.Dataset(id="d"), "prod", 1), "name", "AdapterVersion"),
    (lambda c: c.generate("p", base_model=BASE_MODEL, adapters=["ok", 42]), "adapters[1]", "adapter ref"),
    (lambda c: c.generate("p", base_model=BASE_MODEL, adapters=[("ok", "high")]), "adapters[0]", "number"),
])
def test_wrong_types_name_the_parameter_and_the_expected_types(client: Client, call: Any, param: str,
                                                              expected: str) -> None:
    with pytest.raises(TypeError) as err:
        call(client)
    assert str(err.value).startswith(param) and expected in str(err.value), str(err.value)


def test_async_client_accepts_the_objects_too(services: Services) -> None:
    async def flow() -> training_pb2.TrainingJob:
        async with AsyncClient(services.training_target, inference_target=services.inference_target,
                               timeout=120) as sdk:
            dataset = await sdk.upload_dataset(concept_images(3, seed=12), name="args-async-ds")
            job = await sdk.train("lora", base_model=BASE_MODEL, dataset=dataset, name="args-async", **SMALL)
            with pytest.raises(TypeError, match=r"^job_id must be"):
                await sdk.wait(object())  # type: ignore[arg-type]
            return await sdk.wait(job, timeout=300)

    done = asyncio.run(flow())
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED and done.output.name == "args-async"
