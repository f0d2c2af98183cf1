"""Flax NNX modules: the NeuralMemory layer, attention layouts, and the blocks of every architecture."""

from titans_jax.nn.attention import Attention
from titans_jax.nn.blocks import Block
from titans_jax.nn.memory_layer import NeuralMemory

__all__ = ["Attention", "Block", "NeuralMemory"]
