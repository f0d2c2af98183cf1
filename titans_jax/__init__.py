"""titans_jax: Titans (Behrouz, Zhong, Mirrokni 2024) in JAX and Flax NNX.

Build a model in four lines::

    import titans_jax
    from flax import nnx
    model = titans_jax.TitansLM(titans_jax.get_config("tiny-mac"), rngs=nnx.Rngs(0))
    logits = model(tokens_BxT)
"""

from titans_jax.configs import PRESETS, MemoryConfig, ModelConfig, get_config
from titans_jax.generate import generate
from titans_jax.memory import MemoryState, linear_memory, memory_scan, memory_scan_reference, mlp_memory
from titans_jax.model import TitansLM, count_params
from titans_jax.nn import NeuralMemory

__version__ = "0.1.0"

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
    "memory_scan",
    "memory_scan_reference",
    "mlp_memory",
]
