"""Trainers: DreamBooth, LoRA and Textual Inversion over one shared core.

Public surface: `TrainConfig`, `validate_config`, `validate_against_tokenizer` (config.py) and
`run_training`, `TrainImage`, `TrainerCallbacks`, `TrainResult` (base.py).
"""

from services.training.trainers.base import TrainerCallbacks, TrainImage, TrainResult, run_training
from services.training.trainers.config import TrainConfig, validate_against_tokenizer, validate_config

__all__ = [
    "TrainConfig",
    "TrainImage",
    "TrainResult",
    "TrainerCallbacks",
    "run_training",
    "validate_against_tokenizer",
    "validate_config",
]
