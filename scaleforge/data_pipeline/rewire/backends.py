"""Generation backends behind one interface: a local transformers model, or an OpenAI-compatible server.

Both take a batch of chat requests and return one `Generation` per request, in order. The local
backend decodes a batch as one padded `generate` call (left padding); the HTTP backend sends the
batch's requests concurrently. Either way a batch is fixed by document index upstream, because
padded batched greedy decoding is not batch-invariant: a resumed shard must batch as the first
attempt did to reproduce its outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scaleforge.data_pipeline.rewire.config import RewriteConfig
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class Generation:
    """One reply."""

    text: str
    """The generated text (special tokens removed)."""
    finish_reason: str
    """`stop` (the model ended its reply) or `length` (cut at max_new_tokens)."""
    tokens: int
    """Generated tokens (the model's own tokenizer), the end token not counted."""
    error: str = ""
    """Why the request failed for good (finish_reason `error`); empty otherwise."""


class Generator(Protocol):
    """What the rewrite stage needs from a backend."""

    description: dict
    """What generates (backend and model), recorded with the output."""

    def generate(self, requests: list[list[dict]], cfg: RewriteConfig, seed: int) -> list[Generation]:
        """One generation per chat request, in order."""
        ...


def resolve_model_dir(model: str, log=None) -> Path:
    """The directory of a local model: the packaged SmolLM2 (converted once) or a user directory."""
    from scaleforge.data_pipeline.rewire import model_cache

    if model == model_cache.BUNDLED_MODEL:
        return model_cache.bundled_model_dir(log)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"rewrite.model: {path} is not a Hugging Face model directory (no config.json): "
            f"pass a saved causal-LM directory or {model_cache.BUNDLED_MODEL}"
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise ConfigError(f"rewrite.model: {path} holds no weights (*.safetensors): save the model there")
    return path


class LocalGenerator:
    """A Hugging Face causal LM in this process (CPU or the current CUDA device), fp32."""

    def __init__(self, model_dir: Path, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        if self.tokenizer.pad_token_id is None:
            # Pad positions are masked out, so any id serves; a tokenizer without an end token
            # (a bare BPE, as an exported scaleforge model has) pads with id 0.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model = self.model.to(device).eval()
        self.device = device
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.description = {"backend": "local", "model": self.model_dir.name,
                            "chat_template": self.chat}

    def _prompts(self, requests: list[list[dict]]) -> list[str]:
        if self.chat:
            return [self.tokenizer.apply_chat_template(r, tokenize=False, add_generation_prompt=True)
                    for r in requests]
        # A base model (e.g. a scaleforge export) has no chat template: the request text is the prompt.
        return ["\n\n".join(m["content"] for m in r) + "\n\n" for r in requests]

    def generate(self, requests: list[list[dict]], cfg: RewriteConfig, seed: int) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        enc = self.tokenizer(self._prompts(requests), return_tensors="pt", padding=True,
                             add_special_tokens=not self.chat).to(self.device)
        sample = cfg.temperature > 0
        gen = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=sample,
            temperature=cfg.temperature if sample else None, top_p=cfg.top_p if sample else None,
            top_k=None, repetition_penalty=cfg.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids) or None,
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=gen)
        results = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            kept = row if end is None else row[:end]
            results.append(Generation(
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                finish_reason="length" if end is None else "stop", tokens=len(kept),
            ))
        return results


class HttpGenerator:
    """An OpenAI-compatible chat endpoint (vLLM, SGLang, `transformers serve`), via the openai client.

    `concurrency` requests are in flight at once (a thread pool; `submit` queues a batch and
    returns its futures). The client retries connection errors, timeouts, 429 and 5xx answers
    `retries` times with exponential backoff (0.5 s doubling, at most 8 s, with jitter); a request
    that still fails gives a Generation with finish_reason `error`: its document is marked, the
    task goes on.
    """

    def __init__(self, cfg: RewriteConfig):
        from concurrent.futures import ThreadPoolExecutor

        import openai

        self.endpoint = cfg.endpoint.rstrip("/")
        self.client = openai.OpenAI(base_url=self.endpoint, api_key="none", timeout=cfg.timeout_s,
                                    max_retries=cfg.retries)
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="rewire-http")
        self.description = {"backend": "http", "model": cfg.model}

    def probe(self) -> None:
        """Refuse an endpoint that does not answer (before anything is written)."""
        import httpx

        try:
            httpx.get(f"{self.endpoint}/models", timeout=10.0).raise_for_status()
        except Exception as exc:
            raise ConfigError(
                f"rewrite.endpoint: no OpenAI-compatible server answers at {self.endpoint} "
                f"({type(exc).__name__}): start the server or fix the URL"
            ) from None

    def _one(self, messages: list[dict], cfg: RewriteConfig, seed: int) -> Generation:
        import openai

        extra = {}
        if cfg.repetition_penalty != 1.0 and cfg.server == "vllm":
            extra["repetition_penalty"] = cfg.repetition_penalty  # vLLM/SGLang sampling extension
        elif cfg.repetition_penalty != 1.0 and cfg.server == "transformers":
            # `transformers serve` refuses unknown fields; it takes generation settings as JSON here.
            extra["generation_config"] = json.dumps({"repetition_penalty": cfg.repetition_penalty})
        try:
            resp = self.client.chat.completions.create(
                model=cfg.model, messages=messages, max_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, extra_body=extra or None,
            )
        except openai.OpenAIError as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            return Generation(text="", finish_reason="error", tokens=0,
                              error=f"{self.endpoint} failed after {cfg.retries} retries "
                                    f"({type(exc).__name__}: {first[:160]})")
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        stopped = choice.finish_reason != "length"
        return Generation(
            text=choice.message.content or "",
            finish_reason="stop" if stopped else "length",
            # servers count the end token a stopped reply ends with (OpenAI's usage, vLLM, SGLang,
            # `transformers serve`); `tokens` is the reply's, as the local backend counts it
            tokens=max(0, tokens - 1) if stopped else tokens,
        )

    def submit(self, requests: list[list[dict]], cfg: RewriteConfig, seed: int) -> list:
        """Queue the requests of a batch; one future per request, in order."""
        return [self.pool.submit(self._one, r, cfg, seed + i) for i, r in enumerate(requests)]

    def generate(self, requests: list[list[dict]], cfg: RewriteConfig, seed: int) -> list[Generation]:
        return [f.result() for f in self.submit(requests, cfg, seed)]


_SHARED: dict[str, Generator] = {}


def provide(gen: Generator | None) -> None:
    """Make `gen` the generator of rewrite tasks that run in this process (a model loaded once);
    None: the next task makes the one its config names."""
    _SHARED.pop("generator", None)
    if gen is not None:
        _SHARED["generator"] = gen


def shared_generator(cfg: RewriteConfig) -> Generator:
    """The generator this process provides, else the one `cfg` names, made once per process."""
    if "generator" not in _SHARED:
        _SHARED["generator"] = make_generator(cfg)
    return _SHARED["generator"]


def make_generator(cfg: RewriteConfig, log=None) -> Generator:
    """The backend `cfg` names (the local model is loaded here, once)."""
    if cfg.backend == "http":
        gen = HttpGenerator(cfg)
        gen.probe()
        return gen
    return LocalGenerator(resolve_model_dir(cfg.model, log), cfg.threads)


def describe_json(gen: Generator) -> str:
    """The backend description as canonical JSON."""
    return json.dumps(gen.description, sort_keys=True)
