"""Calibration data sources: text files and named corpora, images, and the model-ready inputs built from them."""
