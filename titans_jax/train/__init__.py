"""Training: optimiser (`optim`), pure train/eval steps (`step`), the trainer (`trainer`: `train` and its loop),
the run directory's layout (`workdir`) and the command line (`python -m titans_jax.train`, see `__main__`).

Importing this package does not import the model; `titans_jax.model` is loaded when a run builds one.
"""

import importlib

# Names load on first use (PEP 562), so importing one submodule (``titans_jax.train.step``, as the benchmarks and the
# accelerator check do) does not pull in the trainer and its data pipeline (grain, tensorflow-datasets).
_LAZY = {
    "RunConfig": "config", "TrainConfig": "config", "apply_overrides": "config", "load_config": "config",
    "make_optimizer": "optim", "make_schedule": "optim",
    "make_eval_step": "step", "make_train_step": "step",
    "Trainer": "trainer", "TrainingDiverged": "trainer", "train": "trainer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"titans_jax.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'titans_jax.train' has no attribute {name!r}")


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
