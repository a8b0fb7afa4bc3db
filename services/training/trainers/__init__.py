"""Trainers: DreamBooth, LoRA and Textual Inversion over one shared core.

Public surface: `TrainConfig`, `validate_config`, `validate_against_family`,
`validate_against_tokenizer` (config.py) and `TrainImage`, `TrainerCallbacks`, `TrainResult`
(base.py). The entry point, `run_training`, is in engine.py and is not re-exported here, so
importing this package never imports torch (services.families, which config.py asks, is plain
data until a family's `part(...)` is imported).
"""

from services.training.trainers.base import TrainerCallbacks, TrainImage, TrainResult
from services.training.trainers.config import (
    TrainConfig,
    validate_against_family,
    validate_against_tokenizer,
    validate_config,
)

__all__ = [
    "TrainConfig",
    "TrainImage",
    "TrainResult",
    "TrainerCallbacks",
    "validate_against_family",
    "validate_against_tokenizer",
    "validate_config",
]
