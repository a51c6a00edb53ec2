"""Write a Hugging Face model directory: config.json, model.safetensors, generation_config.json and
the run's own tokenizer (tokenizer.json, tokenizer_config.json), so that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it offline.

Everything is written into a temporary sibling of OUT, which is renamed onto OUT only once complete:
a failure leaves OUT as it was (absent or an empty directory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError, DataError


def check_target(out: Path) -> None:
    """OUT must not exist, or be an empty directory (nothing is ever overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export target {out} exists and is not empty; pass a new directory")


def run_tokenizer(spec: Any) -> Any:
    """The `tokenizers.Tokenizer` that made the run's token ids (its data stores'; one for all)."""
    from scaleforge.data_pipeline import open_store

    stores = [open_store(path) for path in spec.data.stores]
    if len({store.tokenizer_sha256 for store in stores}) > 1:
        raise DataError(f"data.stores {', '.join(map(str, spec.data.stores))} were made by "
                        "different tokenizers; the run has no single tokenizer to export")
    return stores[0].tokenizer()


def hf_tokenizer(tok: Any, *, max_length: int) -> Any:
    """transformers' fast tokenizer around the run's own, its separator as end/begin/padding token
    (documents are separated by it in the training stream)."""
    from transformers import PreTrainedTokenizerFast

    from scaleforge.data_pipeline.tokenizer import eot_id

    sep = tok.id_to_token(eot_id(tok))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sep, bos_token=sep,
                                   pad_token=sep, model_max_length=max_length)


def write(out: Path, target: Any, state: dict, tokenizer: Any, *, max_length: int) -> None:
    """The model directory at `out` (absent or empty) from transformers-named full tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf_tok = hf_tokenizer(tokenizer, max_length=max_length)
    sep = hf_tok.eos_token_id
    config = AutoConfig.for_model(
        target.model_type, **target.config, architectures=[target.architecture],
        bos_token_id=sep, eos_token_id=sep, pad_token_id=sep, dtype="float32")
    # built on the meta device: no random init, the checkpoint's tensors are assigned as they are
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != target.architecture:
        raise ConfigError(f"transformers built {type(model).__name__}, not {target.architecture}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=sep, eos_token_id=sep,
                                               pad_token_id=sep)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT's mode
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        check_target(out)  # still absent or empty: os.replace then swaps the directory in
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
