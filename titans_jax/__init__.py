"""titans_jax: Titans (Behrouz, Zhong, Mirrokni 2024) in JAX and Flax NNX."""

from titans_jax.memory import MemoryState, linear_memory, memory_scan, memory_scan_reference, mlp_memory

__version__ = "0.1.0"

__all__ = ["MemoryState", "linear_memory", "memory_scan", "memory_scan_reference", "mlp_memory"]
