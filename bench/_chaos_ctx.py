"""The contract between `bench/chaos.py` (the driver) and `bench/chaos_inputs.py` (rows R5, R6
and the cross-tenant probes): one small context object and one row shape.

chaos.py builds a `ChaosContext` over servers it has already started on loopback and calls
`chaos_inputs.input_rows(ctx)` if that module exists; each returned dict is a `Row` (use
`row(...)` to build one) and is printed in the same table as R1-R4.

Everything here is plain data plus two callables, so the inputs module needs no knowledge of
how the driver started its servers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import Settings

PASS = "PASS"
FAIL = "FAIL"


@dataclass
class ChaosContext:
    """What the driver hands to every row function.

    * `training_target` / `inference_target`: "127.0.0.1:port" of a TrainingService +
      RegistryService server and of an InferenceService server (both with auth on).
    * `api_keys`: tenant -> API key (at least two tenants, "tenant-a" and "tenant-b"); call with
      metadata `(("authorization", f"Bearer {key}"),)`.
    * `registry_settings`: Settings of the registry both servers use (open it with
      `services.registry.registry.Registry.from_settings`) to tamper with blobs directly.
    * `base_model`: the tiny base model's name in the registry and in the inference server.
    * `pipeline_dir`: its folder on disk.
    * `make_lora(tenant, name) -> int`: publish a random LoRA for `base_model` as `tenant`
      straight into the registry (about a second), return its version number.
    * `tmp_dir`: a scratch directory removed when the bench ends.
    * `quick`: True for `--quick` smoke runs (use small counts).
    * `time_budget_s`: a soft bound for all input rows together.
    """

    training_target: str
    inference_target: str
    api_keys: dict[str, str]
    registry_settings: Settings
    base_model: str
    pipeline_dir: Path
    make_lora: Callable[[str, str], int]
    tmp_dir: Path
    quick: bool = False
    time_budget_s: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self, tenant: str) -> tuple[tuple[str, str]]:
        """Call metadata authenticating as `tenant`."""
        return (("authorization", f"Bearer {self.api_keys[tenant]}"),)


def row(name: str, what: str, figures: str, ok: bool) -> dict[str, str]:
    """One table row: `name` like "R5", `what` a short description, `figures` the measured
    numbers as one string ("12 blobs, 12 DATA_LOSS, 0 loaded"), `verdict` PASS/FAIL."""
    return {"row": name, "what": what, "figures": figures, "verdict": PASS if ok else FAIL}
