"""Datasets: image sources, preprocessing, dataset stores, ingestion, one-hot targets.

Modules, each building on the ones above it:

- ``labels``      centred one-hot regression targets (numpy only)
- ``preprocess``  pixels as float32; the affine map pixels -> model inputs, its inverse, its statistics (dask)
- ``store``       the dataset store: layout and its checks, row reads as model inputs, fingerprints
- ``sources``     npz / builtin / ImageFolder sources, decoding in parallel processes, ``--resize``
- ``ingestion``   ``ingest``: a source into a dataset store (subsets, splits, resumable from a partial store)

The names below, re-exported from those modules, are what the other packages use.
"""

from kernelscale.data.ingestion import balanced_subset, ingest, partial_path
from kernelscale.data.preprocess import AffineMap, Preprocess
from kernelscale.data.sources import ArraySource, available_memory
from kernelscale.data.store import DatasetStore, open_dataset

__all__ = [
    "AffineMap",
    "ArraySource",
    "DatasetStore",
    "Preprocess",
    "available_memory",
    "balanced_subset",
    "ingest",
    "open_dataset",
    "partial_path",
]
