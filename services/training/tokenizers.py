"""Base-model tokenizers for request-time checks (Textual Inversion tokens).

CreateTrainingJob must answer INVALID_ARGUMENT for a placeholder that already is a token or a
multi-token initializer, rather than accept a job that later FAILS. That needs the base
model's tokenizer: only its few small files are fetched (verified) from the registry, and the
loaded tokenizer is kept per base-model digest.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from services.common.errors import FailedPrecondition
from services.registry.manifests import BaseModelManifest
from services.registry.registry import Registry

TOKENIZER_DIR = "tokenizer"


class BaseModelTokenizers:
    """Loads and caches each base model's tokenizer, keyed by the base model digest."""

    def __init__(self, registry: Registry, max_entries: int = 16) -> None:
        self._registry = registry
        self._max_entries = max_entries
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, manifest: BaseModelManifest) -> Any:
        with self._lock:
            cached = self._cache.get(manifest.digest)
        if cached is not None:
            return cached
        tokenizer = self._load(manifest)
        with self._lock:
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[manifest.digest] = tokenizer
        return tokenizer

    def _load(self, manifest: BaseModelManifest) -> Any:
        with tempfile.TemporaryDirectory(prefix="atelier-tokenizer-") as tmp:
            root = Path(tmp)
            records = [r for r in manifest.files if r.path.startswith(f"{TOKENIZER_DIR}/")]
            if not {f"{TOKENIZER_DIR}/vocab.json", f"{TOKENIZER_DIR}/merges.txt"} <= {r.path for r in records}:
                raise FailedPrecondition(
                    f"base model {manifest.name!r} has no CLIP tokenizer (tokenizer/vocab.json + merges.txt)",
                    "spec.base_model",
                )
            for record in records:
                self._registry.blobs.download_record(record, root / record.path)
            return CLIPTokenizer.from_pretrained(root / TOKENIZER_DIR)
