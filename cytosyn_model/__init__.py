"""cytosyn model package: SD-VAE f8d4 + SiT/2 trained end to end with REPA-E."""

__version__ = "0.1.0"
