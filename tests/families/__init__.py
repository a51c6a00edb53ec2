"""Families defined outside the package, registered through `SCALEFORGE_FAMILIES` (the out-of-tree
hook, docs/adding-a-family.md): they prove that a family needs nothing under `scaleforge/`."""
