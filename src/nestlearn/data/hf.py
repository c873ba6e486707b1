"""Documents from a Hugging Face dataset (``data.source=hf``), read strictly offline.

nestlearn never downloads at run time, so :func:`read_hf_documents` always runs ``load_dataset``
in the libraries' offline mode (for the duration of the call, whatever ``HF_HUB_OFFLINE`` says).
Two ways to use it:

- local files through a packaged builder: ``data.hf_dataset=json`` (or ``text``, ``csv``,
  ``parquet``) with ``data.hf_data_files=path/a.jsonl,more/*.jsonl``;
- a Hub dataset already in the local Hugging Face cache (fetched once beforehand with the
  ``datasets`` library itself): ``data.hf_dataset=owner/name`` and ``data.hf_config``.

Anything else (a Hub dataset not in the cache, missing files, an unknown split) fails with a
DataError that says so. Each row of ``data.hf_text_field`` becomes one document named
``<split>/<row index>`` (zero-padded, so names sort in row order); null rows count as empty.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from nestlearn.config.schema import DataConfig
from nestlearn.data.document import Document
from nestlearn.errors import DataError, require

# Row indices are zero-padded to this width so that names sort in row order.
ROW_DIGITS = 9
# Module attributes the two libraries read (at call time) to decide whether they may go online.
OFFLINE_FLAGS = (
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
)


def read_hf_documents(cfg: DataConfig) -> list[Document]:
    """One document per row of ``cfg.hf_text_field`` in split ``cfg.hf_split``."""
    datasets = require("datasets", "hf")
    if not cfg.hf_dataset:
        raise DataError(
            "data.source=hf needs data.hf_dataset: a cached dataset name, or a builder such as "
            "'json' with data.hf_data_files"
        )
    files = [f.strip() for f in cfg.hf_data_files.split(",") if f.strip()] or None
    try:
        with _offline():
            ds = datasets.load_dataset(
                cfg.hf_dataset, cfg.hf_config or None, data_files=files, split=cfg.hf_split
            )
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(
            f"cannot load dataset '{cfg.hf_dataset}' split '{cfg.hf_split}' ({reason}); nestlearn "
            "is offline: use local files (data.hf_dataset=json data.hf_data_files=a.jsonl,...) "
            "or a dataset already in the Hugging Face cache"
        ) from None
    if cfg.hf_text_field not in ds.column_names:
        raise DataError(
            f"dataset '{cfg.hf_dataset}' has no column '{cfg.hf_text_field}': set "
            f"data.hf_text_field to one of {ds.column_names}"
        )
    docs = []
    for i, text in enumerate(ds[cfg.hf_text_field]):
        if text is not None and not isinstance(text, str):
            raise DataError(
                f"column '{cfg.hf_text_field}' of '{cfg.hf_dataset}' holds "
                f"{type(text).__name__}, not text: set data.hf_text_field to a text column"
            )
        docs.append(Document(f"{cfg.hf_split}/{i:0{ROW_DIGITS}d}", text or ""))
    return docs


@contextmanager
def _offline() -> Iterator[None]:
    """Switch the already-imported HF libraries to offline mode, restoring them afterwards.

    Their environment variables are read once at import, so setting ``HF_HUB_OFFLINE`` here would
    come too late; the module attributes are what their network code checks.
    """
    saved = []
    for module_name, attr in OFFLINE_FLAGS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
