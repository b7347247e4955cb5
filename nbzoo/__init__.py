"""nbzoo: the helper library behind the model-zoo tutorial notebooks."""

__version__ = "0.1.0"
