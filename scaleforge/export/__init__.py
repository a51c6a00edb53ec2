"""Export a trained run to another library's format: `orchestrate export RUN_DIR --to hf OUT`.

The generic part; what a run's model becomes in transformers (its config fields and the tensor
conversion, or a one-line refusal) is the family's own, `hf_target` on its config
(arch/common/family.py, each family's `arch/<family>/hf.py`).

- `gather.py`    the run's last complete checkpoint loaded into one single-process model (TP=PP=EP=1),
                 whatever layout wrote it;
- `writer.py`    config.json, model.safetensors, the run's tokenizer and generation config, written
                 into a temporary directory that is renamed onto OUT only when complete;
- `cli.py`       the verb.
"""
