"""Stage `cytosyn-data features`: H0-mini CLS and tokens added to the shards.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['stage']
