"""Model configurations: a frozen dataclass and the preset registry (``tiny-<variant>`` and the paper's sizes), each
preset with its peak learning rate (``PRESET_PEAK_LR``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa")
GATE_GRANULARITIES = ("head", "layer", "channel")
DTYPES = ("float32", "bfloat16", "float64")  # float64: the tight checks of the tests, under jax.enable_x64
MEMORY_IMPLS = ("dual", "dual_autodiff", "associative", "reference")  # titans_jax.memory.IMPLS (kept equal by a test)
MEMORY_VARIANTS = ("lmm", "mac", "mag", "mal")
ATTENTION_VARIANTS = ("mac", "mag", "mal", "transformer", "swa")


def check_known_fields(cls, fields, what: str | None = None) -> None:
    """Refuse names that are not fields of the dataclass ``cls`` (a typo would otherwise be dropped or crash later).

    Raises ``ValueError`` naming the unknown fields and listing the known ones. The one check every config loader uses.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The options of one NeuralMemory layer (paper Sec. 3.1; ``docs/architecture.md``, "NeuralMemory layer").

    ``ModelConfig.memory`` derives it from the model's flat fields, so presets and ``--set model.memory_depth=1`` keep
    working; a NeuralMemory built on its own takes one directly.

    Attributes:
      heads: memory heads; one memory network per head on ``dim // heads`` channels.
      chunk_size: b, tokens per chunk of the parallel update (gradients of a chunk are taken at its start weights).
      depth: layers of the memory MLP (1 = linear memory).
      expansion: hidden width of the memory MLP as a multiple of the head dim.
      conv_kernel: taps of the causal depthwise conv after the q, k, v projections.
      theta_max: the largest inner learning rate (theta = theta_max * sigmoid(.)).
      momentum, decay: turn the momentum (eta) and forgetting (alpha) terms on; off = the gate is 0.
      gate_granularity: "head" (one gate per token per head), "layer" (one per memory weight matrix) or "channel"
        (the revision's channel-wise forgetting: one alpha per output channel of every memory weight matrix; theta and
        eta stay per head).
      chunk_constant_gates: replace gates by their chunk means (paper Sec. 3.2, "parameters as functions of chunks").
      learned_init: W_0 is a learned parameter per head (Titans); False starts every sequence from W_0 = 0, an empty
        memory, as DeltaNet and Gated DeltaNet do (linear memory only).
      impl: the memory scan's implementation (``titans_jax.memory.IMPLS``): "dual" (the fast path, the default),
        or a checked alternative ("dual_autodiff", "associative", "reference") for tests and comparisons.
      remat_every: the fast path's backward keeps every n-th chunk-start state and recomputes the rest.
      dtype: activation dtype; the memory state accumulates in float32.
    """

    heads: int
    chunk_size: int = 16
    depth: int = 2
    expansion: int = 4
    conv_kernel: int = 4
    theta_max: float = 0.1
    momentum: bool = True
    decay: bool = True
    gate_granularity: str = "head"
    chunk_constant_gates: bool = False
    learned_init: bool = True
    impl: str = "dual"
    remat_every: int = 4
    dtype: str = "float32"

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"MemoryConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for f in ("heads", "chunk_size", "depth", "expansion", "conv_kernel", "remat_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "must be a positive int")
        if self.gate_granularity not in GATE_GRANULARITIES:
            bad("gate_granularity", f"must be one of {GATE_GRANULARITIES}")
        if self.gate_granularity == "channel" and not self.decay:
            bad("gate_granularity", "'channel' is a forgetting gate per channel; it needs decay=True")
        if not self.learned_init and self.depth != 1:
            bad("learned_init", "W_0 = 0 is an empty memory only for the linear memory (depth=1); a deep memory "
                "needs a learned W_0")
        if self.theta_max <= 0:
            bad("theta_max", "must be > 0")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.impl not in MEMORY_IMPLS:
            bad("impl", f"must be one of {MEMORY_IMPLS}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a TitansLM. Frozen and hashable, so it can be a static jit argument.

    Memory options give the linear-memory baselines as configs: ``memory_depth=1, memory_momentum=False`` is Gated
    DeltaNet style; adding ``memory_decay=False`` is DeltaNet / TTT-Linear style.
    """

    variant: str = "mac"
    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = round_up(mlp_ratio * dim, 8) (Llama)
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # Memory (paper Sec. 3.1; docs/architecture.md, "Memory networks" and "NeuralMemory layer").
    chunk_size: int = 16
    memory_depth: int = 2
    memory_expansion: int = 4
    conv_kernel: int = 4
    memory_momentum: bool = True
    memory_decay: bool = True
    gate_granularity: str = "head"  # "head" | "layer" | "channel" (MemoryConfig.gate_granularity)
    chunk_constant_gates: bool = False
    theta_max: float = 0.1
    memory_learned_init: bool = True  # False: W_0 = 0, an empty memory (DeltaNet baselines; linear memory only)
    memory_impl: str = "dual"  # memory scan implementation (MemoryConfig.impl)
    memory_remat_every: int = 4  # backward keeps every n-th chunk-start state (4: fastest measured on CPU)
    # Attention (paper Sec. 4; docs/architecture.md, "Architectures").
    segment_len: int = 512  # MAC segment C
    mac_memory_tokens: int | None = None  # MAC N_l retrieved tokens per segment; None: segment_len // 2 (paper: 256 of 512)
    window: int = 2048  # SWA window (MAG, MAL, swa)
    num_persistent: int = 128
    # Numerics.
    dtype: str = "float32"  # activation / matmul dtype; parameters stay float32 ("float64": tests under enable_x64)
    remat: bool = False  # rematerialise each block in the backward pass

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        if self.variant not in VARIANTS:
            bad("variant", f"must be one of {VARIANTS}")
        for f in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "chunk_size", "memory_depth",
                  "memory_expansion", "conv_kernel", "segment_len", "window"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "must be a positive int")
        if self.num_persistent < 0:
            bad("num_persistent", "must be >= 0")
        if self.dim % self.num_heads:
            bad("dim", f"must be divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            bad("num_heads", "dim // num_heads must be even for RoPE")
        if self.gate_granularity not in GATE_GRANULARITIES:
            bad("gate_granularity", f"must be one of {GATE_GRANULARITIES}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.theta_max <= 0:
            bad("theta_max", "must be > 0")
        if self.variant == "mac":
            if self.chunk_size > self.segment_len:
                bad("chunk_size", f"must be <= segment_len={self.segment_len} for MAC")
            if self.segment_len % self.chunk_size:
                bad("segment_len", f"must be a multiple of chunk_size={self.chunk_size} for MAC")
        # MAC's memory tokens per segment: groups of segment_len / N_l consecutive tokens share one (docs/architecture.md).
        n_l = self.mac_memory_tokens
        if n_l is not None and (isinstance(n_l, bool) or not isinstance(n_l, int)
                                or not 1 <= n_l <= self.segment_len or self.segment_len % n_l):
            bad("mac_memory_tokens", f"must be None or an int in [1, segment_len={self.segment_len}] that divides "
                "segment_len")
        if n_l is None and self.variant == "mac" and self.segment_len % 2:
            bad("mac_memory_tokens", f"None means segment_len // 2, which must divide segment_len={self.segment_len}; "
                "set it explicitly for an odd segment_len")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(-(-int(self.mlp_ratio * self.dim) // 8) * 8)

    @property
    def memory_tokens_per_segment(self) -> int:
        """MAC's N_l: ``mac_memory_tokens``, or half the segment (the paper's 256 of 512) when it is None."""
        return self.mac_memory_tokens or self.segment_len // 2

    @property
    def has_memory(self) -> bool:
        return self.variant in MEMORY_VARIANTS

    @property
    def memory(self) -> MemoryConfig:
        """The NeuralMemory options of this model."""
        return MemoryConfig(heads=self.num_heads, chunk_size=self.chunk_size, depth=self.memory_depth,
                            expansion=self.memory_expansion, conv_kernel=self.conv_kernel, theta_max=self.theta_max,
                            momentum=self.memory_momentum, decay=self.memory_decay,
                            gate_granularity=self.gate_granularity, chunk_constant_gates=self.chunk_constant_gates,
                            learned_init=self.memory_learned_init, impl=self.memory_impl,
                            remat_every=self.memory_remat_every,
                            dtype=self.dtype)

    def replace(self, **overrides) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        check_known_fields(cls, d)
        return cls(**d)


# The revision's Table 5 (blocks, dim, heads, peak LR). The paper gives no 400M shape; none is offered.
PAPER_SIZES = {
    "170m": dict(num_layers=12, dim=768, num_heads=16),
    "340m": dict(num_layers=24, dim=1024, num_heads=16),
    "760m": dict(num_layers=24, dim=1536, num_heads=16),
    "1.3b": dict(num_layers=18, dim=2048, num_heads=8),
}
PAPER_PEAK_LR = {"170m": 3e-3, "340m": 1.5e-3, "760m": 1.25e-3, "1.3b": 7e-4}
# The tiny presets' peak learning rate: tuned on Shakespeare bytes (docs/architecture.md, "Training stability": keep
# them at lr <= 3e-3).
TINY_PEAK_LR = 3e-3
PAPER_DEFAULTS = dict(vocab_size=32000, max_seq_len=4096, chunk_size=16, segment_len=512, window=2048,
                      num_persistent=128, memory_depth=2, memory_expansion=4, dtype="bfloat16")
TINY = dict(vocab_size=256, dim=128, num_layers=2, num_heads=4, max_seq_len=1024, chunk_size=16, segment_len=64,
            window=64, num_persistent=4, memory_depth=2, memory_expansion=2)


NOMINAL_SIZES = {"170m": 170e6, "340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}
BASELINES = ("gated-deltanet", "deltanet")
MATCHED_VARIANTS = VARIANTS + BASELINES
# Widths of the size-matched presets ``<size>-<variant>-matched``: the paper's preset with the multiple of 64 as width
# whose parameter count is closest to the nominal size (docs/architecture.md, "Presets"); derived and checked by
# ``python -m experiments.size_matched_presets`` and tests/test_model.py.
MATCHED_DIMS: dict[tuple[str, str], int] = {
    ("170m", "lmm"): 832,
    ("170m", "mac"): 768,
    ("170m", "mag"): 768,
    ("170m", "mal"): 768,
    ("170m", "transformer"): 896,
    ("170m", "swa"): 896,
    ("170m", "gated-deltanet"): 832,
    ("170m", "deltanet"): 832,
    ("340m", "lmm"): 896,
    ("340m", "mac"): 832,
    ("340m", "mag"): 832,
    ("340m", "mal"): 832,
    ("340m", "transformer"): 960,
    ("340m", "swa"): 960,
    ("340m", "gated-deltanet"): 960,
    ("340m", "deltanet"): 960,
    ("760m", "lmm"): 1408,
    ("760m", "mac"): 1280,
    ("760m", "mag"): 1280,
    ("760m", "mal"): 1280,
    ("760m", "transformer"): 1536,
    ("760m", "swa"): 1536,
    ("760m", "gated-deltanet"): 1472,
    ("760m", "deltanet"): 1472,
    ("1.3b", "lmm"): 2112,
    ("1.3b", "mac"): 1984,
    ("1.3b", "mag"): 1920,
    ("1.3b", "mal"): 1920,
    ("1.3b", "transformer"): 2304,
    ("1.3b", "swa"): 2304,
    ("1.3b", "gated-deltanet"): 2240,
    ("1.3b", "deltanet"): 2240,
}


def _baseline(name: str, base: dict) -> ModelConfig:
    """The linear-memory baselines as configs: one matrix, no momentum, an empty initial memory (W_0 = 0, not learned)
    and no persistent tokens, as the published DeltaNet (also no forgetting) and Gated DeltaNet."""
    fields = {**base, "memory_depth": 1, "memory_momentum": False, "memory_learned_init": False, "num_persistent": 0}
    if name == "deltanet":
        fields["memory_decay"] = False
    return ModelConfig(variant="lmm", **fields)


def _presets() -> tuple[dict[str, ModelConfig], dict[str, float]]:
    """``(configs, peak learning rates)`` of every preset: a paper size's presets (its variants, baselines and
    size-matched widths) take that size's peak learning rate, the tiny ones ``TINY_PEAK_LR``."""
    out, lrs = {}, {}
    sizes = {"tiny": TINY, **{s: {**PAPER_DEFAULTS, **shape} for s, shape in PAPER_SIZES.items()}}
    for prefix, base in sizes.items():
        lr = PAPER_PEAK_LR.get(prefix, TINY_PEAK_LR)
        for variant in VARIANTS:
            out[f"{prefix}-{variant}"], lrs[f"{prefix}-{variant}"] = ModelConfig(variant=variant, **base), lr
        for name in BASELINES:
            out[f"{prefix}-{name}"], lrs[f"{prefix}-{name}"] = _baseline(name, base), lr
    for (size, variant), dim in MATCHED_DIMS.items():
        name = f"{size}-{variant}-matched"
        out[name], lrs[name] = out[f"{size}-{variant}"].replace(dim=dim), PAPER_PEAK_LR[size]
    return out, lrs


PRESETS: dict[str, ModelConfig]
# The peak learning rate each preset is trained with unless train.lr is given: the revision's Table 5 for the paper's
# sizes (170M 3e-3, 340M 1.5e-3, 760M 1.25e-3, 1.3B 7e-4), TINY_PEAK_LR for the tiny presets.
PRESET_PEAK_LR: dict[str, float]
PRESETS, PRESET_PEAK_LR = _presets()


def is_paper_preset(name: str | None) -> bool:
    """Whether ``name`` is a preset of one of the paper's sizes (``170m-mac``, ``1.3b-deltanet``, ``340m-mag-matched``,
    ...), the shapes meant for a large tokenizer and corpus."""
    return name in PRESETS and name.split("-")[0] in PAPER_SIZES


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name (``tiny-mac``, ``340m-mag``, ``tiny-gated-deltanet``, ...) or a path to a JSON file of fields,
    with field overrides applied on top."""
    if name.endswith(".json"):
        with open(name) as f:
            cfg = ModelConfig.from_dict(json.load(f))
    elif name in PRESETS:
        cfg = PRESETS[name]
    else:
        raise ValueError(f"unknown config {name!r}: use a .json file or one of {sorted(PRESETS)}")
    if overrides:
        check_known_fields(ModelConfig, overrides)
        cfg = cfg.replace(**overrides)
    return cfg
