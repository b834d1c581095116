"""What lmms-eval's plugin loader reads: model name -> class name in the module ``<this package>.<model name>``."""

AVAILABLE_MODELS = {"nvila": "NVILA"}
