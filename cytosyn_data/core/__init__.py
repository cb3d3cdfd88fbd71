"""Layer 1 of cytosyn_data: what every other layer uses. Errors and the one CLI handler (exit codes),
value checks, stage configs (YAML sections), executors (local process pool, Dask), hashing
(tile-key hashes and stable string hashes), per-stratum quotas.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['checks', 'config', 'errors', 'executors', 'hashing', 'quotas']
