"""Training: one loop (``accelerate``) for pretraining and the three conversion stages
(alignment, distillation, SFT). See docs/training.md.

Light to import: the loop, data and stage modules load torch/transformers machinery on first use.
"""

from .config import (
    AlignConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)

__all__ = [
    "AlignConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "train",
]


def train(*args, **kwargs):
    """Run one training stage; see :func:`wuneng.train.loop.train`."""
    from .loop import train as _train

    return _train(*args, **kwargs)
