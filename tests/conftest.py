"""Test-wide JAX settings: 8 fake CPU devices for sharding tests, strict numerics (no silent rank promotion), LLVM at
-O0 and a persistent compilation cache (docs/architecture.md, "The test suite").

Most of the suite's time is XLA compiling small programs, and many are compiled more than once (a fresh ``jax.jit`` of
the same function in another test, the other xdist worker, a command run again in a subprocess, which inherits the
environment). The cache is keyed by the program and the compiler, so a hit runs exactly the code a fresh compile would
produce. ``TITANS_TEST_JAX_CACHE=0`` turns it off.
"""

import os
import pathlib

# The tests check values, not speed: LLVM at -O0 compiles the suite's many small programs about a third faster (XLA's
# own HLO optimisations, fusion included, still run). Timing belongs to experiments/, which compile at the default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if os.environ.get("TITANS_TEST_JAX_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
