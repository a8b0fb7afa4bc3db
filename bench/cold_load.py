"""Cold load: first request for an adapter (S3 fetch + verify + parse + attach) minus a warm request,
next to a raw S3 GET of the same bytes (target: within +100 ms of the GET).

The registry is a real S3 server (moto) on loopback. For each of N fresh adapters: one cold
request, one warm request (same adapter, now cached), one raw boto3 GET of its blob.

    .venv/bin/python bench/cold_load.py [--adapters 8] [--rank 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import boto3
from _common import (
    TENANT,
    EngineHandle,
    LoopThread,
    Row,
    print_rows,
    publish_loras,
    request,
    settings_for,
    setup_torch,
    tiny_pipeline,
)

from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from tests.fixtures.s3 import MotoServer, make_s3_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_torch()
    moto = MotoServer()
    moto.start()
    try:
        run(moto, args)
    finally:
        moto.stop()


def run(moto: MotoServer, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        bucket = moto.create_bucket()
        s3 = make_s3_settings(moto.endpoint, bucket)
        settings = settings_for(
            tmp,
            pipeline_dir,
            "cold",
            registry_url=s3.registry_url,
            s3_endpoint_url=s3.s3_endpoint_url,
            s3_access_key_id=s3.s3_access_key_id,
            s3_secret_access_key=s3.s3_secret_access_key,
        )
        registry = Registry.from_settings(settings)
        names = [f"cold-{i}" for i in range(args.adapters)]
        publish_loras(registry, pipeline_dir, tmp, names, rank=args.rank)
        client = boto3.client(
            "s3",
            endpoint_url=moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id=s3.s3_access_key_id,
            aws_secret_access_key=s3.s3_secret_access_key,
        )
        prefix = s3.registry_url[len(f"s3://{bucket}") :].strip("/")
        loop = LoopThread()
        engine = EngineHandle(loop, settings, registry)
        engine.generate(request(steps=args.steps))  # base model loaded; the measure is about adapters
        cold, warm, get, extra = [], [], [], []
        size = 0
        for name in names:
            blob = registry.adapters.resolve(AdapterRef(TENANT, name)).files[0]
            size = blob.size
            req = request([(name, 1.0)], steps=args.steps)
            cold.append(_ms(lambda r=req: engine.generate(r)))
            warm.append(_ms(lambda r=req: engine.generate(r)))
            key = f"{prefix}/blobs/sha256/{blob.sha256}" if prefix else f"blobs/sha256/{blob.sha256}"
            get.append(_ms(lambda k=key: client.get_object(Bucket=bucket, Key=k)["Body"].read()))
            extra.append(cold[-1] - warm[-1] - get[-1])
        engine.close()
        loop.stop()
    added = statistics.median(c - w for c, w in zip(cold, warm, strict=True))
    print_rows(
        f"cold load ({args.adapters} LoRAs of {size / 1024:.0f} KiB, moto S3 on loopback)",
        [
            Row("warm request", statistics.median(warm)),
            Row("cold request", statistics.median(cold)),
            Row("cold minus warm (fetch+verify+parse+attach)", added),
            Row("raw S3 GET of the same bytes", statistics.median(get)),
            Row(
                "cold minus warm minus raw GET",
                statistics.median(extra),
                target="<= +100 ms",
                ok=statistics.median(extra) <= 100.0,
            ),
        ],
    )


def _ms(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


if __name__ == "__main__":
    main()
