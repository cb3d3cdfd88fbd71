"""Evaluation of generated tiles: extractor registry, feature caching, metrics, reports (`cytosyn-eval`)."""
