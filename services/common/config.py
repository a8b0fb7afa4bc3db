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
    http_port: int = Field(
        8080, description="HTTP/JSON gateway + web console port of `atelier serve`; 0 disables it."
    )
    http_sse_keepalive_seconds: float = Field(
        15.0, description="A `: keepalive` comment on a Server-Sent Events stream quiet this long (idle proxies)."
    )
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
    admin_tenants: str = Field(
        "", description="Comma-separated tenants allowed to import/delete the shared base models (auth on)."
    )

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
    gc_grace_seconds: float = Field(
        86400.0, ge=0, description="Blob GC keeps unreferenced blobs younger than this (uploads in flight)."
    )
    gc_interval_seconds: float = Field(
        21600.0, ge=0, description="Periodic blob GC in `atelier serve`/`atelier worker`; 0 disables it."
    )

    # --- training ---------------------------------------------------------------------
    database_url: str = Field("sqlite:///var/atelier.db", description="SQLAlchemy URL of the job store.")
    worker_id: str = Field("", description="Worker identity; hostname-pid when empty.")
    worker_poll_seconds: float = Field(1.0, description="Idle worker's queue poll interval.")
    lease_seconds: float = Field(60.0, description="A claimed job's lease; renewed by heartbeat.")
    heartbeat_seconds: float = Field(10.0, description="Lease renewal interval.")
    max_job_attempts: int = Field(3, description="Attempts before a job FAILS for good.")
    training_device: str = Field("cpu", description="torch device for training.")
    worker_health_port: int = Field(
        50053, description="`atelier worker` grpc.health.v1 port (readiness: job store + registry); 0 disables."
    )
    worker_health_check_seconds: float = Field(
        5.0, gt=0, description="How often the worker re-checks the job store and the registry for its health."
    )
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
    max_image_side: int = Field(
        8192, description="Parse-time ceiling on width, height and init-image sides; the real size limit is "
        "max_latent_pixels."
    )
    max_latent_pixels: int = Field(
        65536, gt=0, description="Latent-area budget per image: (width/f) x (height/f) at most this, f = the base "
        "model's VAE scale factor (65536: 2048x2048 on SD 1.x/SDXL, 512x512 on the tiny model)."
    )
    device_stuck_seconds: float = Field(
        10.0, ge=0, description="Health goes NOT_SERVING while the device has been busy this long on a batch "
        "nobody waits for any more; 0 disables the watchdog."
    )
    attention_chunk_elements: int = Field(
        2**24, ge=0, description="Largest attention score matrix one CPU SDPA call computes during inference; "
        "larger ones are split with an abort check between parts (0: never split; CUDA never splits)."
    )
    exact_batching: bool = Field(
        True, description="Batched requests give the same bytes as alone (UNet per request); off: faster GPU batches."
    )
    continuous_batching: bool = Field(
        False, description="Step-level scheduler: requests join and leave a running batch between denoising steps."
    )
    adapter_ref_ttl_seconds: float = Field(
        10.0, description="How long an alias/latest adapter reference is reused before re-resolving it."
    )
    preload_adapters: str = Field(
        "", description="Comma-separated BASE/TENANT/NAME[@VERSION|:ALIAS] loaded (in order, into the device tier) "
        "before the inference server reports SERVING."
    )
    pinned_adapters: str = Field(
        "", description="Same format: attached before SERVING and never evicted from the device tier "
        "(they count against its bounds; pins that do not fit fail start-up)."
    )
    usage_retention_hours: float = Field(
        168.0, gt=0, description="How long a process keeps its per-minute usage buckets for GetUsage."
    )
    usage_flush_seconds: float = Field(
        10.0, gt=0, description="How often a training worker writes its buffered usage to the job store "
        "(also at each job's last step and at shutdown)."
    )
    safety_checker: str = Field(
        "", description="Content-safety hook module:function, called per generated image (HxWx3 uint8 array); "
        "true = flagged, replaced by a black image. Empty: off."
    )
    safety_checker_options: str = Field(
        "{}", description="JSON object of keyword arguments passed to the safety checker with each image."
    )

    # --- quotas and webhooks (per tenant; 0 = unlimited) ----------------------------------
    quota_concurrent_jobs: int = Field(0, description="Most RUNNING training jobs per tenant; more stay QUEUED.")
    quota_queued_jobs: int = Field(
        0, description="Most QUEUED training jobs per tenant; CreateTrainingJob refuses more."
    )
    quota_stored_bytes: int = Field(
        0, description="Most registry bytes per tenant (adapter versions + datasets); new uploads/jobs refused above."
    )
    quota_generate_rps: float = Field(0.0, description="Generate requests per second per tenant (token bucket).")
    quota_generate_burst: int = Field(0, description="Token-bucket size for quota_generate_rps; 0 = max(1, rps).")
    webhook_max_attempts: int = Field(10, description="Delivery attempts per job webhook before giving up.")
    webhook_backoff_seconds: float = Field(1.0, description="First webhook retry delay; doubles per attempt.")
    webhook_max_backoff_seconds: float = Field(300.0, description="Cap on the webhook retry delay.")
    webhook_timeout_seconds: float = Field(10.0, description="HTTP timeout of one webhook delivery attempt.")
    webhook_poll_seconds: float = Field(1.0, description="How often a process looks for due webhook deliveries.")

    def local_base_models(self) -> dict[str, Path]:
        """`base_model_paths` parsed: 'a=/models/a,b=/models/b' -> {'a': Path('/models/a'), ...}.

        Here, not in inference, because the registry API validates adapter imports against the
        same folders the inference engine serves.
        """
        paths: dict[str, Path] = {}
        for item in filter(None, (part.strip() for part in self.base_model_paths.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"base_model_paths entry {item!r}: expected name=DIR")
            paths[name.strip()] = Path(path.strip())
        return paths
