"""Generator backends: one `complete()` over chat conversations, three ways to run an LLM.

- TransformersGenerator: in-process transformers model (a Hugging Face folder or a GGUF file,
  de-quantised by transformers), batched with left padding. The CPU default and the tests.
- VLLMGenerator: vLLM's offline engine on a GPU worker (the `gpu` extra).
- OpenAIGenerator: any OpenAI-compatible /v1/chat/completions endpoint (a vLLM server, a hosted
  API), called concurrently with retries.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ml_core.config import GenerationConfig

if TYPE_CHECKING:
    from ml_core.registry import ModelRegistry, ModelSpec

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]

# ChatML, used only when a tokenizer carries no chat template of its own (SmolLM2 and Qwen use
# this format); a model with its own template always keeps it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Below this many shared tokens, prefilling them once is not worth a cache copy.
MIN_SHARED_PREFIX = 16


class GeneratorError(RuntimeError):
    """A generator backend cannot be loaded or failed to answer."""


@runtime_checkable
class Generator(Protocol):
    """Completes chat conversations: one assistant reply per conversation, in input order."""

    def complete(
        self,
        conversations: list[Conversation],
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]: ...


def _weights_of(source: ModelSpec | Path | str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a spec or a path (folder, or a .gguf file)."""
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_file() and path.suffix == ".gguf":
            return path.parent, path.name
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        has_config = (path / "config.json").is_file()
        return (path, ggufs[0].name) if ggufs and not has_config else (path, None)
    weights = source.weights
    if source.format == "gguf":
        return weights.parent, weights.name
    if source.format != "hf":
        raise GeneratorError(f"generator {source.name!r}: format {source.format!r} cannot generate")
    return weights, None


class TransformersGenerator:
    """An in-process causal LM: batched, left-padded, chat-templated sampling."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.model = model.eval()
        self.precision = "bf16" if str(model.dtype).endswith("bfloat16") else "fp32"
        self.tokenizer = tokenizer
        self.device = device
        # Decoder-only models must be padded on the left so every row's next token follows its
        # own last prompt token.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            log.warning("tokenizer has no chat template; using ChatML")
            self.tokenizer.chat_template = CHATML_TEMPLATE
        # transformers 5 renamed the KV cache argument and output field `past_key_values` to
        # `cache` (the old name warns, and goes in 6.0); older releases know only the old one.
        self._cache_name = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )

    @classmethod
    def load(
        cls, source: ModelSpec | Path | str, device: str | None = None, precision: str = "auto"
    ) -> TransformersGenerator:
        """Load a Hugging Face folder or a GGUF file (via `gguf_file=`); returns the generator.

        `precision` ("auto", "fp32", "bf16"; see `resolve_precision`) is the weights' and the
        computation's number format: GGUF weights are de-quantised by transformers, then cast
        (docs/benchmarks.md, "bf16 generation").
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ml_core.student import configure_threads, resolve_precision

        folder, gguf_file = _weights_of(source)
        configure_threads()  # TAILOR_TORCH_THREADS, as the student and teacher honour it
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        bf16 = resolve_precision(precision, device) == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).to(device)
        return cls(model, tokenizer, device)

    def render(self, conversation: Conversation) -> str:
        """The prompt text for a conversation, ending with the assistant's turn opener."""
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )

    def complete(
        self,
        conversations: list[Conversation],
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]:
        """One reply per conversation (new tokens only, special tokens removed)."""
        import torch

        if not conversations:
            return []
        prompts = [self.render(c) for c in conversations]
        # The chat template already holds the special tokens (BOS etc.); don't add them twice.
        batch, cache = self._encode_sharing_prefix(prompts)
        prompt_len = batch["input_ids"].shape[1]
        sampling = self.sampling(temperature)
        stop = _FirstLineDone(self.tokenizer, prompt_len)
        # fork_rng: seed the sampling without disturbing the caller's global torch RNG.
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(
                **batch,
                **({self._cache_name: cache} if cache is not None else {}),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=[stop],
                **sampling,
            )
        return self.tokenizer.batch_decode(output[:, prompt_len:], skip_special_tokens=True)

    def sampling(self, temperature: float) -> dict[str, Any]:
        """generate()'s decoding arguments: greedy at temperature 0, else transformers' own
        sampling from the tempered softmax over the whole vocabulary."""
        if temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}

    def _encode_sharing_prefix(self, prompts: list[str]) -> tuple[dict[str, Any], Any]:
        """Token ids and mask for a batch, plus a KV cache of the prompts' shared prefix.

        Few-shot prompts of one batch share their system prompt and examples (most of their
        tokens); on a CPU the prefill of those tokens is most of the cost of generation, so the
        shared prefix is run once and its cache copied across the batch. Rows are laid out as
        [prefix][left padding][own suffix]: the attention mask hides the padding and position
        ids follow the mask, so every row sees exactly what it would see alone (tested equal to
        the plain path under greedy decoding). Returns (batch, None) when there is no useful
        shared prefix.
        """
        import torch

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shared = 0
        shortest = min(len(row) for row in ids)
        # Keep at least one token of each row's own, so every row has a suffix to feed.
        while shared < shortest - 1 and len({row[shared] for row in ids}) == 1:
            shared += 1
        if len(ids) < 2 or shared < MIN_SHARED_PREFIX:
            batch = self.tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            return batch, None
        prefix = torch.tensor([ids[0][:shared]], device=self.device)
        with torch.inference_mode():
            cache = getattr(self.model(prefix, use_cache=True), self._cache_name)
        cache.batch_repeat_interleave(len(ids))
        suffixes = [row[shared:] for row in ids]
        width = max(len(row) for row in suffixes)
        pad = self.tokenizer.pad_token_id
        suffix_ids = torch.tensor([[pad] * (width - len(r)) + r for r in suffixes])
        suffix_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in suffixes])
        input_ids = torch.cat([prefix.cpu().repeat(len(ids), 1), suffix_ids], dim=1)
        mask = torch.cat([torch.ones(len(ids), shared, dtype=torch.long), suffix_mask], dim=1)
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        return batch, cache


class _FirstLineDone:
    """Stopping criterion: a row is done once its reply has a complete non-empty first line.

    Only the first line is used as the query, so generating past it wastes most of the time of
    a batch on CPU. Leading blank lines do not count (a reply may open with a newline).
    """

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new_tokens = input_ids[:, self.prompt_len:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        done = [("\n" in t.lstrip()) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class VLLMGenerator:
    """vLLM's offline engine (GPU workers); vllm is imported only when this backend is used."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @classmethod
    def load(cls, source: ModelSpec | Path | str, **engine_kwargs: Any) -> VLLMGenerator:
        """Start a vLLM engine on the model; GeneratorError naming the `gpu` extra without vllm."""
        try:
            from vllm import LLM
        except ImportError as exc:
            raise GeneratorError(
                "generation.backend 'vllm' needs vLLM, which is only installed on GPU workers: "
                "pip install 'tailor[gpu]' (or use backend 'transformers' or 'openai')"
            ) from exc
        folder, gguf_file = _weights_of(source)
        if gguf_file:
            # vLLM reads GGUF weights from the file; the tokenizer from the folder when present.
            has_tokenizer = (folder / "tokenizer_config.json").is_file()
            tokenizer = folder if has_tokenizer else folder / gguf_file
            engine_kwargs.setdefault("tokenizer", str(tokenizer))
            return cls(LLM(model=str(folder / gguf_file), **engine_kwargs))
        return cls(LLM(model=str(folder), **engine_kwargs))

    def complete(
        self,
        conversations: list[Conversation],
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]:
        """One reply per conversation; request i is sampled with seed + i."""
        from vllm import SamplingParams

        if not conversations:
            return []
        params = [
            SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed + i)
            for i in range(len(conversations))
        ]
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


class OpenAIGenerator:
    """An OpenAI-compatible chat completions endpoint, called through the `openai` SDK from a
    small thread pool.

    The SDK retries connection errors, 408, 409, 429 and 5xx answers up to `max_retries` times
    with exponential backoff (0.5 s doubling to 8 s, jittered), honouring Retry-After; any other
    error raises GeneratorError with the server's message. `backoff_s` is accepted and unused:
    the SDK's backoff is not configurable.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None,
        model: str,
        max_workers: int = 8,
        max_retries: int = 5,
        backoff_s: float | None = None,
        timeout_s: float = 120.0,
        client: Any = None,
    ) -> None:
        import openai

        del backoff_s
        self.url = chat_completions_url(endpoint)
        self.model = model
        self.max_workers = max_workers
        # Without a key no Authorization header is sent (a local vLLM server needs none); the
        # SDK insists on a key, so it gets a placeholder and the header is omitted per request.
        self._headers = {} if api_key else {"Authorization": openai.Omit()}
        self.client = client or openai.OpenAI(
            api_key=api_key or "none",
            base_url=self.url.removesuffix("/chat/completions"),
            max_retries=max_retries,
            timeout=timeout_s,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()

    def complete(
        self,
        conversations: list[Conversation],
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]:
        """One reply per conversation, in input order; request i carries seed + i."""
        jobs = [
            {
                "model": self.model,
                "messages": conversation,
                "temperature": temperature,
                "max_tokens": max_new_tokens,
                "seed": seed + i,
                "n": 1,
            }
            for i, conversation in enumerate(conversations)
        ]
        if len(jobs) <= 1:
            return [self._post(job) for job in jobs]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
            return list(pool.map(self._post, jobs))

    def _post(self, body: dict[str, Any]) -> str:
        import openai

        try:
            response = self.client.chat.completions.create(**body, extra_headers=self._headers)
        except openai.APIStatusError as exc:
            raise GeneratorError(
                f"{self.url} answered {exc.status_code}: {exc.message[:300]}"
            ) from exc
        except openai.APIConnectionError as exc:
            raise GeneratorError(f"{self.url}: {exc}") from exc
        if not response.choices:
            raise GeneratorError(f"{self.url} answered without choices")
        return response.choices[0].message.content or ""


def chat_completions_url(endpoint: str) -> str:
    """The full chat completions URL for a base URL ('http://h:8000', '.../v1' or the full URL)."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def load_generator(
    cfg: GenerationConfig,
    spec: ModelSpec | str | Path,
    registry: ModelRegistry | None = None,
    **backend_kwargs: Any,
) -> Generator:
    """The generator for `cfg.backend`: TransformersGenerator, VLLMGenerator or OpenAIGenerator.

    `spec` is the generator's ModelSpec (or a model folder / .gguf path); for the openai backend a
    plain string is the model name sent to the endpoint (a spec sends its name). `registry` is
    accepted for call-site symmetry with the other loaders.
    """
    del registry  # specs are bound to their folders already
    if cfg.backend == "openai":
        model = spec if isinstance(spec, str) else getattr(spec, "name", str(spec))
        api_key = os.environ.get(cfg.api_key_env)
        return OpenAIGenerator(cfg.endpoint or "", api_key, str(model), **backend_kwargs)
    if cfg.backend == "vllm":
        return VLLMGenerator.load(spec, **backend_kwargs)
    backend_kwargs.setdefault("precision", cfg.precision)
    return TransformersGenerator.load(spec, **backend_kwargs)


__all__: Sequence[str] = (
    "Conversation",
    "Generator",
    "GeneratorError",
    "OpenAIGenerator",
    "TransformersGenerator",
    "VLLMGenerator",
    "chat_completions_url",
    "load_generator",
)
