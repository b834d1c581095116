"""Data: shard format, synthetic demo data, streaming and tokenization."""
