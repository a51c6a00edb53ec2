"""GPT-J-style parallel blocks: x + attn(norm(x)) + mlp(norm(x)), one pre-norm per layer.

`config.py` is the torch-free half of the family contract, `model.py` the builder half; register it
with `SCALEFORGE_FAMILIES=families.parallel_block.config:ParallelBlockConfig` (tests/ on PYTHONPATH).
"""
