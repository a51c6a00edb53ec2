"""scaleforge: plan compute-optimal pretraining from scaling laws, train it with megatron-core, refit."""

__version__ = "0.1.0"
