"""Prometheus metrics of the inference engine, registered on an injected registry.

One `InferenceMetrics` per engine owns every metric family (so two engines in one test
process can each use their own `CollectorRegistry`); each cache tier gets the labelled
children it updates through `tier()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


@dataclass(frozen=True)
class TierMetrics:
    """The children one cache tier updates: hits, misses, evictions, load latency, size."""

    hits: Counter
    misses: Counter
    evictions: Counter
    load_seconds: Histogram
    used_bytes: Gauge
    entries: Gauge


class InferenceMetrics:
    """Cache, queue, batch and denoising metrics (see docs/architecture.md, Inference)."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "atelier") -> None:
        def name(suffix: str) -> str:
            return f"{namespace}_inference_{suffix}"

        self._hits = Counter(name("cache_hits"), "Adapter cache hits", ["tier"], registry=registry)
        self._misses = Counter(name("cache_misses"), "Adapter cache misses", ["tier"], registry=registry)
        self._evictions = Counter(
            name("cache_evictions"), "Adapter cache evictions", ["tier"], registry=registry
        )
        self._load = Histogram(
            name("cache_load_seconds"), "Time to load one entry into a cache tier", ["tier"],
            buckets=LOAD_BUCKETS, registry=registry,
        )
        self._bytes = Gauge(name("cache_bytes"), "Bytes held by a cache tier", ["tier"], registry=registry)
        self._entries = Gauge(name("cache_entries"), "Entries held by a cache tier", ["tier"], registry=registry)
        self.queue_depth = Gauge(name("queue_depth"), "Requests admitted and waiting for the device",
                                 registry=registry)
        self.batch_size = Histogram(name("batch_size"), "Requests merged into one pipeline call",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.adapters_per_batch = Histogram(name("adapters_per_batch"),
                                            "Distinct LoRA/TI adapters attached for one batch",
                                            buckets=BATCH_BUCKETS, registry=registry)
        self.queue_wait = Histogram(name("queue_wait_seconds"), "Time from queueing to entering a batch",
                                    buckets=LOAD_BUCKETS, registry=registry)
        self.step_batch_size = Histogram(name("step_batch_size"), "Live requests in one denoising step",
                                         buckets=BATCH_BUCKETS, registry=registry)
        self.step_seconds = Histogram(name("denoise_step_seconds"), "Wall time of one denoising step",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.images = Counter(name("images_generated"), "Images returned to callers", registry=registry)
        self.rejected = Counter(name("requests_rejected"), "Requests refused because the queue was full",
                                registry=registry)
        self.safety_flagged = Counter(name("safety_flagged"), "Images the safety hook flagged and replaced",
                                      registry=registry)

    def tier(self, tier: str) -> TierMetrics:
        """The labelled children for one tier ("disk", "host", "device", "dreambooth")."""
        return TierMetrics(
            hits=self._hits.labels(tier=tier),
            misses=self._misses.labels(tier=tier),
            evictions=self._evictions.labels(tier=tier),
            load_seconds=self._load.labels(tier=tier),
            used_bytes=self._bytes.labels(tier=tier),
            entries=self._entries.labels(tier=tier),
        )
