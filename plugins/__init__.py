"""First-party plugins that are neither encoders, compressors nor precision backends: LLM backbones, pruners."""
