"""Spatial and temporal visual-token compressors, and projectors."""
