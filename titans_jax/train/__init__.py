"""Training: optimiser (`optim`), pure train/eval steps (`step`), the loop (`loop`) and the command line
(`python -m titans_jax.train`, see `__main__`).

Importing this package does not import the model; `titans_jax.model` is loaded when a run builds one.
"""

from titans_jax.train.config import RunConfig, TrainConfig, apply_overrides, load_config
from titans_jax.train.loop import TrainingDiverged, train
from titans_jax.train.optim import make_optimizer, make_schedule
from titans_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "RunConfig",
    "TrainConfig",
    "TrainingDiverged",
    "apply_overrides",
    "load_config",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "train",
]
