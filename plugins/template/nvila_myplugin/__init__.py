"""An nvila plugin package: one compressor, registered through the ``nvila`` entry-point group."""
