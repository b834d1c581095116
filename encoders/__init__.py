"""Vision encoders and their preprocessing."""
