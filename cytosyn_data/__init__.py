"""cytosyn data stages: whole-slide images to lossless PNG WebDataset shards.

Stages are pure functions over explicit inputs and outputs (paths and parquet
tables) with a thin CLI on top (``cytosyn-data``). See ``docs/tiling.md``.
"""

__version__ = "0.1.0"
