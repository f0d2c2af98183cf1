"""Flax NNX modules: the NeuralMemory layer, attention, one token mixer per architecture, and the block around them."""

from titans_jax.nn.attention import Attention, KVCache
from titans_jax.nn.blocks import Block
from titans_jax.nn.memory_layer import MemoryStream, NeuralMemory
from titans_jax.nn.mixers import (
    MIXERS,
    AttentionMixer,
    AttentionState,
    LMMMixer,
    LMMState,
    MACMixer,
    MACState,
    MAGMixer,
    MAGState,
    MALMixer,
    MALState,
    make_mixer,
)

__all__ = [
    "MIXERS",
    "Attention",
    "AttentionMixer",
    "AttentionState",
    "Block",
    "KVCache",
    "LMMMixer",
    "LMMState",
    "MACMixer",
    "MACState",
    "MAGMixer",
    "MAGState",
    "MALMixer",
    "MALState",
    "MemoryStream",
    "NeuralMemory",
    "make_mixer",
]
