"""Mamba-2 family: pure Mamba-2 and hybrid (Mamba-2 / attention / MLP) stacks (docs/mamba.md)."""
