"""Mixture-of-Recursions family (docs/mor.md): config.py (torch-free shape and accounting),
model.py (megatron builder)."""
