"""Stage `cytosyn-data split`: settings (config), assignment of tiles to splits (assign), the leakage audit
(audit), the shard shuffle (shuffle), JPEG/expanded variants (expand), orchestration (stage).

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['assign', 'audit', 'config', 'expand', 'shuffle', 'stage']
