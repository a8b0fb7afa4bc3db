"""The content-safety hook through gRPC (Generate, GenerateStream), the SDK and the CLI.

Two real servers over one registry: one with the default settings (hook off), one configured by
settings with the shipped example checker (`mean_brightness_above`), its threshold set between
the brightness of the off-server's images, so the same spec gives flagged and clean images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from atelier.cli.main import app
from atelier.client import Client
from atelier_api.v1 import inference_pb2
from services.common.config import Settings
from services.inference.safety import SafetyHook
from tests.fixtures.s3 import MotoServer
from tests.integration.test_inference_support import (
    BASE,
    SIZE,
    STEPS,
    InferenceEnv,
    engine_settings,
    pixels,
    spec,
    start_env,
)

CHECKER = "services.inference.safety:mean_brightness_above"
SPEC = {"prompt": "a red box", "seed": 21, "num_images": 4}


@pytest.fixture(scope="module")
def servers(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceEnv, InferenceEnv, float]]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-safety")
    bucket = moto_server.create_bucket()
    plain = start_env(engine_settings(moto_server.endpoint, bucket, tmp / "plain", tiny_random_pipeline_dir),
                      tiny_random_pipeline_dir)
    means = sorted(float(pixels(i.png).mean()) for i in plain.generate(**SPEC).images)
    threshold = (means[1] + means[2]) / 2
    assert means[1] < threshold < means[2]
    guarded = start_env(engine_settings(moto_server.endpoint, bucket, tmp / "guarded", tiny_random_pipeline_dir,
                                        safety_checker=CHECKER,
                                        safety_checker_options=json.dumps({"threshold": threshold})),
                        tiny_random_pipeline_dir)
    yield plain, guarded, threshold
    guarded.close()
    plain.close()


def check_replaced(clean: inference_pb2.GenerateResponse, checked: inference_pb2.GenerateResponse,
                   threshold: float) -> list[bool]:
    """Each checked image is the clean one, or (brighter than threshold) black and flagged."""
    flags = []
    for before, after in zip(clean.images, checked.images, strict=True):
        flagged = pixels(before.png).mean() > threshold
        assert after.safety_flagged == flagged and after.seed == before.seed
        assert (after.width, after.height) == (before.width, before.height)
        if flagged:
            assert not pixels(after.png).any()
        else:
            assert after.png == before.png
        flags.append(bool(flagged))
    return flags


def test_off_by_default_nothing_is_flagged(servers: tuple[InferenceEnv, InferenceEnv, float]) -> None:
    plain, _guarded, _t = servers
    assert Settings().safety_checker == "" and not plain.engine.safety.enabled
    assert [i.safety_flagged for i in plain.generate(**SPEC).images] == [False] * 4


def test_generate_replaces_and_marks_flagged_images(servers: tuple[InferenceEnv, InferenceEnv, float]) -> None:
    plain, guarded, threshold = servers
    flags = check_replaced(plain.generate(**SPEC), guarded.generate(**SPEC), threshold)
    assert flags.count(True) == 2


def test_generate_stream_result_is_checked_too(servers: tuple[InferenceEnv, InferenceEnv, float]) -> None:
    plain, guarded, threshold = servers
    events = list(guarded.stub.GenerateStream(inference_pb2.GenerateStreamRequest(spec=spec(**SPEC)), timeout=60))
    assert events[-1].HasField("result")
    assert check_replaced(plain.generate(**SPEC), events[-1].result, threshold).count(True) == 2


def test_sdk_exposes_the_flags(servers: tuple[InferenceEnv, InferenceEnv, float]) -> None:
    plain, guarded, threshold = servers
    expected = check_replaced(plain.generate(**SPEC), guarded.generate(**SPEC), threshold)
    with Client(guarded.server.target, inference_target=guarded.server.target) as client:
        result = client.generate("a red box", base_model=BASE, seed=21, num_images=4, steps=STEPS,
                                 width=SIZE, height=SIZE)
    assert result.safety_flagged == expected
    for image, flagged in zip(result.images, expected, strict=True):
        assert (not np.asarray(image).any()) == flagged


def test_cli_reports_the_flags(servers: tuple[InferenceEnv, InferenceEnv, float], tmp_path: Path) -> None:
    plain, guarded, threshold = servers
    expected = check_replaced(plain.generate(**SPEC), guarded.generate(**SPEC), threshold)
    args = ["--inference-target", guarded.server.target, "--json", "generate", "a red box", "--base", BASE,
            "--seed", "21", "--num-images", "4", "--steps", str(STEPS), "--size", str(SIZE),
            "-o", str(tmp_path / "out.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout)["response"]["images"]
    assert [i["safety_flagged"] for i in images] == expected


def test_a_failing_checker_fails_the_request_and_sends_nothing(
        servers: tuple[InferenceEnv, InferenceEnv, float]) -> None:
    _plain, guarded, _t = servers

    def broken(_image: np.ndarray) -> bool:
        raise RuntimeError("moderation backend down")

    hook = guarded.engine.safety
    guarded.engine.safety = SafetyHook(broken)
    try:
        with pytest.raises(grpc.RpcError) as err:
            guarded.generate(**SPEC)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "moderation" not in (err.value.details() or "")  # internals stay in the server log
    finally:
        guarded.engine.safety = hook
    assert len(guarded.generate(**SPEC).images) == 4  # and the server keeps serving

