"""Layer 2: bytes on disk and in object storage. Atomic writes (temporary name, rename), tar shard
writing and reading, PNG codecs, fsspec remote access, memory-mapped feature files, TRIDENT/CLAM
coordinate h5 files.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['atomic', 'coords_h5', 'feature_file', 'png', 'remote', 'tar_read', 'tar_write']
