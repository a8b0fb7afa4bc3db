"""One settings object for every Atelier process.

Every field is read from an `ATELIER_<FIELD>` environment variable (case-insensitive), so a
Kubernetes ConfigMap or a shell export configures any process the same way. Objects get the
settings through their constructors; nothing reads the environment anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """All knobs, grouped by the component that reads them."""

    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    # --- processes and servers -------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gRPC servers bind to.")
    training_port: int = Field(50051, description="TrainingService + RegistryService gRPC port.")
    inference_port: int = Field(50052, description="InferenceService gRPC port.")
    metrics_port: int = Field(9090, description="Prometheus /metrics HTTP port; 0 disables it.")
    grpc_max_message_bytes: int = Field(64 * MiB, description="Max gRPC message size, both ways.")
    shutdown_grace_seconds: float = Field(30.0, description="In-flight work allowed on SIGTERM.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate; TLS is on when set.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")
    log_level: str = Field("INFO", description="Python log level.")
    log_json: bool = Field(True, description="JSON log lines with a request id.")
    data_dir: Path = Field(Path("var"), description="Local state: SQLite, caches, local registry.")
    torch_threads: int = Field(0, description="torch intra-op CPU threads per process; 0 keeps torch's default.")

    # --- auth -------------------------------------------------------------------------
    auth_enabled: bool = Field(False, description="Require `authorization: Bearer <key>`.")
    api_keys: str = Field("", description="Comma-separated key=tenant pairs.")
    api_keys_file: Path | None = Field(None, description="File of key=tenant lines (a mounted Secret).")
    default_tenant: str = Field("default", description="Tenant of every call when auth is off.")

    # --- registry ---------------------------------------------------------------------
    registry_url: str = Field(
        "file://var/registry", description="file://DIR or s3://BUCKET[/PREFIX] for the registry."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, R2, moto...).")
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(None, description="S3 key id; boto3's chain when unset.")
    s3_secret_access_key: str | None = Field(None, description="S3 secret key.")
    s3_multipart_threshold_bytes: int = Field(64 * MiB, description="Blobs above this use multipart.")
    s3_multipart_part_bytes: int = Field(16 * MiB, description="Multipart part size (S3 minimum 5 MiB).")
    s3_connect_timeout_seconds: float = Field(2.0, description="S3 connect timeout.")
    s3_read_timeout_seconds: float = Field(30.0, description="S3 read timeout.")
    s3_max_attempts: int = Field(2, description="boto3 retry attempts per S3 call.")

    # --- training ---------------------------------------------------------------------
    database_url: str = Field("sqlite:///var/atelier.db", description="SQLAlchemy URL of the job store.")
    worker_id: str = Field("", description="Worker identity; hostname-pid when empty.")
    worker_poll_seconds: float = Field(1.0, description="Idle worker's queue poll interval.")
    lease_seconds: float = Field(60.0, description="A claimed job's lease; renewed by heartbeat.")
    heartbeat_seconds: float = Field(10.0, description="Lease renewal interval.")
    max_job_attempts: int = Field(3, description="Attempts before a job FAILS for good.")
    training_device: str = Field("cpu", description="torch device for training.")
    progress_event_interval_seconds: float = Field(
        0.5, ge=0, description="Least seconds between two progress events in a job's Watch log; 0: every step."
    )
    max_dataset_images: int = Field(32, description="Most images one dataset may hold.")
    max_dataset_bytes: int = Field(128 * MiB, description="Most bytes one dataset may hold.")
    max_image_pixels: int = Field(40_000_000, description="Decompression-bomb guard, per image.")
    min_image_side: int = Field(64, description="Smallest accepted image side in pixels.")
    max_train_steps: int = Field(20_000, description="Upper bound on max_train_steps.")
    max_train_resolution: int = Field(1024, description="Upper bound on resolution.")
    max_train_batch_size: int = Field(32, description="Upper bound on train_batch_size.")

    # --- inference --------------------------------------------------------------------
    inference_device: str = Field("cpu", description="torch device for inference.")
    inference_dtype: str = Field("float32", description="float32, float16 or bfloat16.")
    base_model_paths: str = Field("", description="Comma-separated name=DIR base models on local disk.")
    cache_dir: Path = Field(Path("var/cache"), description="Disk tier of the adapter cache.")
    disk_cache_bytes: int = Field(10 * GiB, description="Disk tier bound.")
    host_cache_bytes: int = Field(2 * GiB, description="Host RAM tier bound (state dicts).")
    device_cache_bytes: int = Field(1 * GiB, description="Device tier bound (attached adapters).")
    device_cache_max_adapters: int = Field(8, description="Most adapters attached at once.")
    dreambooth_cache_bytes: int = Field(4 * GiB, description="Bound on swapped-in DreamBooth components.")
    queue_size: int = Field(64, description="Pending generation requests before RESOURCE_EXHAUSTED.")
    max_batch_size: int = Field(4, description="Most requests merged into one pipeline call.")
    batch_wait_ms: float = Field(5.0, description="How long the batcher waits for companions.")
    max_adapters_per_request: int = Field(8, description="Adapters one request may mix.")
    max_inference_steps: int = Field(150, description="Upper bound on steps.")
    max_images_per_request: int = Field(8, description="Upper bound on num_images.")
    max_image_side: int = Field(2048, description="Upper bound on width and height.")
    exact_batching: bool = Field(
        True, description="Batched requests give the same bytes as alone (UNet per request); off: faster GPU batches."
    )
    adapter_ref_ttl_seconds: float = Field(
        10.0, description="How long an alias/latest adapter reference is reused before re-resolving it."
    )
