"""Stage `cytosyn-data split`: assignment of tiles to splits, the shard shuffle, JPEG/expanded variants.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['expand', 'shuffle', 'stage']
