"""Layer 5: what a person reads. Markdown summaries, the HTML run report, QuPath GeoJSON, QC pictures.
A report never fails a stage.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['coords_export', 'guard', 'site', 'geojson', 'html', 'markdown', 'qc_pictures']
