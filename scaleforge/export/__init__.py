"""Export a trained run to another library's format: `orchestrate export RUN_DIR --to hf OUT`.

- `targets.py`   torch-free: which Hugging Face architecture a run's model becomes, or a one-line
                 refusal naming the setting transformers cannot express;
- `llama.py`, `moe.py`, `mamba2.py`, `nemotron_h.py`: one family mapping each (HF config fields and
                 the tensor conversion from the gathered megatron state);
- `gather.py`    the run's last complete checkpoint loaded into one single-process model (TP=PP=EP=1),
                 whatever layout wrote it;
- `writer.py`    config.json, model.safetensors, the run's tokenizer and generation config, written
                 into a temporary directory that is renamed onto OUT only when complete;
- `cli.py`       the verb.
"""
