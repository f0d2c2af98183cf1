"""titans_jax: Titans (Behrouz, Zhong, Mirrokni 2024) in JAX and Flax NNX.

Build a model in four lines::

    import titans_jax
    from flax import nnx
    model = titans_jax.TitansLM(titans_jax.get_config("tiny-mac"), rngs=nnx.Rngs(0))
    logits = model(tokens_BxT)

A trained model, from a training workdir or an export (``python -m titans_jax.export``), local or ``gs://``, and
its evaluation (``python -m titans_jax.eval``)::

    model, config, tokenizer = titans_jax.load_model("runs/default")
    result = titans_jax.eval.evaluate(model, tokenizer, "niah-passkey", lengths=[512, 2048])
"""

from titans_jax.configs import PRESETS, MemoryConfig, ModelConfig, get_config
from titans_jax.generate import generate
from titans_jax.memory import MemoryState, linear_memory, memory_scan, memory_scan_reference, mlp_memory
from titans_jax.model import TitansLM, count_params
from titans_jax.nn import NeuralMemory

__version__ = "0.1.0"


def __getattr__(name):
    # load_model loads on first use (PEP 562): it pulls in orbax and the trainer's modules, which a plain
    # ``import titans_jax`` should not pay for.
    if name == "load_model":
        from titans_jax.export import load_model

        return load_model
    if name == "eval":  # the evaluation package (titans_jax.eval.evaluate, table, plot), also on first use
        import importlib

        return importlib.import_module("titans_jax.eval")
    raise AttributeError(f"module 'titans_jax' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "MemoryConfig",
    "MemoryState",
    "ModelConfig",
    "NeuralMemory",
    "TitansLM",
    "count_params",
    "generate",
    "get_config",
    "linear_memory",
    "load_model",
    "memory_scan",
    "memory_scan_reference",
    "mlp_memory",
]
