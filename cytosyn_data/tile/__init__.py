"""Stage `cytosyn-data tile`: settings (config), detection, selection (plan), the per-tile kernel
(render), shard writing, the stage's orchestration, and the join of part tables (merge).

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['config', 'detect', 'merge', 'plan', 'render', 'stage', 'write']
