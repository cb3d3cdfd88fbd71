"""Layer 4: the run folder's contract. Every table schema (schemas), the run folder's paths (paths), run.json and locks (state), slide tables and TCGA barcodes,
synthetic runs with the exact schemas.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['barcode', 'paths', 'records', 'schemas', 'slide_table', 'state', 'synthetic']
