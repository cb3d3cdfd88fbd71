"""Layer 3: whole-slide images. Slide handles, the one reader factory (``slide.load_wsi``) and read
plans (openslide, tiffslide, DICOM), pixel helpers, the fast tiled-TIFF reader, tissue and pen-ink
masks, include/exclude regions.

See docs/architecture.md for the layers and what each owns.
"""

__all__ = ['pixels', 'regions', 'slide', 'tiff_reader', 'tissue']
