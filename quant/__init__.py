"""Precision backends: how weights and activations are stored and computed."""
