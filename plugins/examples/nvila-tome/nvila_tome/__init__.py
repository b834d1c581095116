"""Token merging (ToMe, Bolya et al. 2023) as an nvila compressor: similar visual tokens are averaged."""
