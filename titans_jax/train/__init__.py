"""Training: optimiser (`optim`), pure train/eval steps (`step`), the trainer (`trainer`: `train` and its loop),
the run directory's layout (`workdir`) and the command line (`python -m titans_jax.train`, see `__main__`).

Importing this package does not import the model; `titans_jax.model` is loaded when a run builds one.
"""

from titans_jax.train.config import RunConfig, TrainConfig, apply_overrides, load_config
from titans_jax.train.optim import make_optimizer, make_schedule
from titans_jax.train.step import make_eval_step, make_train_step
from titans_jax.train.trainer import Trainer, TrainingDiverged, train

__all__ = [
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "load_config",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "train",
]
