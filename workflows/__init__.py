"""What users run: the `nvila` command (`commands.py`), the Lightning training stages and their recipes,
evaluation, pruning, benchmarks and sweeps. See docs/architecture.md."""
