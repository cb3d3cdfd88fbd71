"""Stage `cytosyn-data curate`: iBOT features, the cross-validated artifact probe, review sheets.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['stage']
