"""Stage `cytosyn-data tile`: detection, selection (plan), the per-tile kernel (render), shard writing
and the stage's orchestration.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['detect', 'plan', 'render', 'stage', 'write']
