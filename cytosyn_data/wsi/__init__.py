"""Layer 3: whole-slide images. Slide handles and read plans (openslide, tiffslide, DICOM), the fast
tiled-TIFF reader, tissue and pen-ink masks, include/exclude regions.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['regions', 'slide', 'tiff_reader', 'tissue']
