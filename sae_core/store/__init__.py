"""A sharded on-disk store of activation rows for SAE training.

Layout of a store folder::

    manifest.json                 format, d, dtype, total tokens, shards, columns, attrs, complete
    shard-00000.safetensors       "activations" [n, d] + one [n] tensor per metadata column
    shard-00001.safetensors
    ...

:class:`ActivationWriter` buffers rows in RAM up to ``shard_tokens`` rows, writes each full shard
atomically (temp file + ``os.replace``) and keeps ``manifest.json`` up to date with
``"complete": false`` while it runs; only :meth:`ActivationWriter.close` marks the store
complete. A crashed or aborted run therefore leaves a folder that any reader recognises as
unfinished.

:class:`ActivationReader` validates the manifest against the shards and streams fixed-size
batches, shuffled across shards with bounded memory: the shard order is permuted per epoch,
``shuffle_shards`` shards at a time are loaded, and rows are permuted within that window.
Every row is yielded exactly once per epoch, and the order is a pure function of
``(seed, epoch)``.
"""

from .format import ACTIVATIONS_KEY, FORMAT, FORMAT_VERSION, MANIFEST_NAME, IncompleteStoreError, StoreFormatError
from .reader import ActivationBatch, ActivationReader
from .writer import ActivationWriter

__all__ = [
    "ACTIVATIONS_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "StoreFormatError",
    "ActivationBatch",
    "ActivationReader",
    "ActivationWriter",
    "IncompleteStoreError",
]
