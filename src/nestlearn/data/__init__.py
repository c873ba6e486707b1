"""Text to token streams: corpora, tokenizers, the token cache and batching.

Models never import this package; the trainer and evaluator do.
"""

from nestlearn.data.batches import eval_batches, train_batch
from nestlearn.data.corpus import (
    cap_bytes,
    corpus_fingerprint,
    read_documents,
    split_documents,
)
from nestlearn.data.document import Document
from nestlearn.data.fingerprint import check_resume_data, data_fingerprint, describe_data_change
from nestlearn.data.hf import read_hf_documents
from nestlearn.data.prepare import TokenizedCorpus, prepare_data, prepare_text, stream_dtype
from nestlearn.data.tokenizer import (
    EOS,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "EOS",
    "BPETokenizer",
    "ByteTokenizer",
    "Document",
    "TokenizedCorpus",
    "Tokenizer",
    "build_tokenizer",
    "cap_bytes",
    "check_resume_data",
    "corpus_fingerprint",
    "data_fingerprint",
    "describe_data_change",
    "eval_batches",
    "load_tokenizer",
    "prepare_data",
    "prepare_text",
    "read_documents",
    "read_hf_documents",
    "split_documents",
    "stream_dtype",
    "train_batch",
]
