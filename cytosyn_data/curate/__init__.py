"""Stage `cytosyn-data curate`: iBOT features (backbone), the cross-validated artifact probe (probes),
contact sheets and weak labels (sheets), the commands' orchestration (stage).

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['backbone', 'probes', 'sheets', 'stage']
