"""Batched chat sampling: shared by generate, simulate, rollout and data-generation stages.

`chat_generate` samples with HF `generate` from a loaded model. `generate_chat` takes a
model name instead and picks the engine (`pick_engine`): vLLM (optional dependency) when it
is installed and a GPU is present, on CPU CTranslate2 (pipeline/ct2_engine.py, the same
greedy replies as HF) where the engine probe found it faster for the model on this host
(pipeline/engine_probe.py), batched HF generation otherwise -- same prompts (the
tokenizer's chat template), same sampling settings, same `Completion` records.
`heedful serve` (serving/engine.py) and the LLM client (pipeline/llm.py) choose between
CTranslate2 and HF the same way (`pick_local_engine`), from the same `engine` setting.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .chat import Messages, render_many
from .cpu_linear import model_min_rows as packed_min_rows
from .cpu_linear import packed_linears


class SamplingSettings(BaseModel):
    """Sampling knobs; temperature 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=50, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)


#: PEFT's name for rows of a mixed batch written with the adapter off (`chat_generate`'s `adapters`)
BASE_ROWS = "__base__"


@dataclass
class Completion:
    text: str
    num_tokens: int
    finished: bool  # ended with EOS rather than hitting max_new_tokens


def chat_generate(
    model,
    tokenizer,
    conversations: list[Messages],
    sampling: SamplingSettings,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    prompt_suffix: str = "",
    share_prefix: bool = True,
    adapters: list[str] | None = None,
) -> list[list[Completion]]:
    """Sample `num_samples` replies per conversation, `batch_size` conversations at a time.

    Seeded per batch, so a rerun with the same config reproduces the same replies.
    `prompt_suffix` opens the assistant turn with fixed text (e.g. a Chain-of-Hindsight phrase).
    `share_prefix`: a batch's common start (a system turn and few-shot examples, as every simulated
    user's feedback and answer prompt has) runs through the model once and each row continues from
    its cache (pipeline/prefix_logits.py `prefixed_batch`); the same replies up to float rounding.
    On a CPU the decode steps' linear layers run on packed weights (pipeline/cpu_linear.py).
    `adapters`: per conversation, the PEFT adapter its rows are written with on a PEFT `model`
    (`BASE_ROWS`: the adapter off), so conditions that differ only in the adapter share a batch
    (PEFT's mixed-batch LoRA); None: the model as it is. Those batches run every prompt whole: a
    shared start's keys and values differ between adapters.
    """
    # one fp32 row at a time decodes matrix-vector products (MKL is as fast): packing would only cost
    decode_rows = min(len(conversations), batch_size) * num_samples
    fewest = packed_min_rows(model)
    with packed_linears(model) if fewest is not None and decode_rows >= fewest else contextlib.nullcontext():
        return _chat_generate(
            model,
            tokenizer,
            conversations,
            sampling,
            num_samples,
            batch_size,
            seed,
            on_batch,
            prompt_suffix,
            share_prefix and adapters is None,
            adapters,
        )


def _chat_generate(
    model,
    tokenizer,
    conversations: list[Messages],
    sampling: SamplingSettings,
    num_samples: int,
    batch_size: int,
    seed: int,
    on_batch: Callable[[int, int], None] | None,
    prompt_suffix: str,
    share_prefix: bool,
    adapters: list[str] | None = None,
) -> list[list[Completion]]:
    import torch
    from transformers import set_seed

    from .prefix_logits import prefixed_batch

    tokenizer.padding_side = "left"
    texts = [text + prompt_suffix for text in render_many(tokenizer, conversations)]
    eos_ids = _eos_ids(model, tokenizer)
    out: list[list[Completion]] = []
    device = next(model.parameters()).device
    n_batches = (len(texts) + batch_size - 1) // batch_size
    for b in range(n_batches):
        chunk = texts[b * batch_size : (b + 1) * batch_size]
        set_seed(seed + b)
        enc: Any = None
        if share_prefix:
            token_lists = [tokenizer.encode(text, add_special_tokens=False) for text in chunk]
            enc = prefixed_batch(model, token_lists, tokenizer.pad_token_id or 0, repeat=num_samples)
        if enc is None:
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # one row per sample, as a prefixed batch has (HF's num_return_sequences refuses the greedy
            # call that top-k sampling runs in)
            enc = {key: value.repeat_interleave(num_samples, dim=0) for key, value in enc.items()}
        _grow_cache(model, enc, sampling.max_new_tokens)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            repetition_penalty=sampling.repetition_penalty,
        )
        kwargs.update(hf_sampling_kwargs(sampling, model.generation_config))
        if adapters is not None:
            kwargs["adapter_names"] = [
                name for name in adapters[b * batch_size : (b + 1) * batch_size] for _ in range(num_samples)
            ]
        with torch.no_grad():
            generated = model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        del enc  # the batch's key/value cache with it, before the next batch builds its own
        new = generated[:, width:]
        for i in range(len(chunk)):
            replies = []
            for j in range(num_samples):
                tokens = new[i * num_samples + j].tolist()
                finished = False
                for k, tok in enumerate(tokens):
                    if tok in eos_ids:
                        tokens, finished = tokens[:k], True
                        break
                while tokens and tokens[-1] == tokenizer.pad_token_id:
                    tokens.pop()
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                replies.append(Completion(text, len(tokens), finished))
            out.append(replies)
        if on_batch is not None:
            on_batch(b + 1, n_batches)
    return out


def _grow_cache(model, enc: dict[str, Any], max_new_tokens: int) -> None:
    """Give `generate` a cache it writes in place (pipeline/kv_cache.py): the prefix cache
    `prefixed_batch` put in `enc`, made growing, else a fresh one."""
    from .kv_cache import cache_kwargs, in_place, make_growing
    from .prefix_logits import cache_keyword

    prefix = enc.get(cache_keyword(model))
    if prefix is None:
        enc.update(cache_kwargs(model, max_new_tokens))
    elif in_place(model):
        make_growing(prefix, max_new_tokens)


def hf_sampling_kwargs(sampling: SamplingSettings, generation_config: Any = None) -> dict[str, Any]:
    """HF `generate` arguments for sampling (temperature > 0) or greedy decoding. Sampling draws
    from the top k tokens only (pipeline/top_k_sampler.py: HF's distribution, without a
    multinomial over the whole vocabulary every step); given the model's `generation_config`,
    the log names sampling filters it sets that this does not apply."""
    from .top_k_sampler import hf_generate_sampling, warn_unapplied

    if sampling.temperature > 0 and generation_config is not None:
        warn_unapplied(generation_config)
    return hf_generate_sampling(sampling.temperature, sampling.top_k, sampling.top_p)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


# ----------------------------------------------------------------------------- engine switch

Engine = Literal["auto", "hf", "ct2", "vllm"]
#: prompts per call when a stage hands a whole queue to the engine (CTranslate2 sorts them by length)
ENGINE_BATCH = 64
#: each resolved engine as a stage's log names it ("replies from CTranslate2")
ENGINE_LABELS = {"hf": "HF generate", "ct2": "CTranslate2", "vllm": "vLLM"}
#: the `engine` setting of every config that samples from a local model (stages, the LLM client,
#: `heedful serve`): one field, one help text; `pick_engine` / `pick_local_engine` resolve it
EngineSetting = Annotated[
    Engine,
    Field(
        description="auto: vLLM when installed and on a GPU (batch stages only), on CPU the faster of CTranslate2 "
        "and HF generate (measured once per host and model), else HF generate; hf: HF generate; ct2: CTranslate2 "
        "on CPU (same greedy replies as HF)"
    ),
]
#: vLLM only serves LoRA adapters up to one of these ranks (its accepted max_lora_rank values)
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """vLLM's `max_lora_rank` for an adapter of `rank`: the smallest value it accepts that holds it."""
    return next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)


def largest_lora_rank(r: int, rank_pattern: dict[str, int] | None) -> int:
    """A LoRA config's largest rank: `r`, or a larger one its `rank_pattern` gives some modules."""
    return max([int(r), *(int(v) for v in (rank_pattern or {}).values())])


def adapter_rank(adapter: str | Path) -> int:
    """The largest LoRA rank in a saved adapter (`r`, and its `rank_pattern` when it has one)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return largest_lora_rank(config.get("r", 16), config.get("rank_pattern"))


def vllm_unavailable_reason(device: str | None = None) -> str | None:
    """None when vLLM can run here; otherwise why not (for logs and errors)."""
    if device is not None and not device.startswith("cuda"):
        return f"device is {device}"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def pick_engine(
    engine: str = "auto", device: str | None = None, model_name: str | None = None, new_tokens: int | None = None
) -> str:
    """'auto' -> 'vllm' on a CUDA machine that has it; on CPU, with CTranslate2 installed, the
    faster of 'ct2' and 'hf' for `model_name` on this host (pipeline/engine_probe.py: measured
    once, cached; 'ct2' when no model is named); else 'hf'. 'hf', 'vllm' and 'ct2' insist
    (clear error when impossible). `new_tokens`: about how many tokens the job will write; one
    too small to repay the probe takes the known answer or HF (engine_probe.PROBE_PAYS_FROM).

    'ct2' is the CPU engine (pipeline/ct2_engine.py: CTranslate2, fp32, greedy replies equal to
    HF's); bench/generate.py measures it against HF `generate` (docs/generation.md).
    """
    if engine == "hf":
        return "hf"
    if engine == "ct2":
        from .ct2_engine import ct2_unavailable_reason

        reason = ct2_unavailable_reason()
        if reason:
            raise RuntimeError(f"engine: ct2 cannot run: {reason}; use engine: hf")
        return "ct2"
    if engine not in ("auto", "vllm"):
        raise ValueError(f"engine must be auto, hf, ct2 or vllm (got {engine!r})")
    reason = vllm_unavailable_reason(device)
    if engine == "vllm" and reason:
        raise RuntimeError(f"engine: vllm cannot run: {reason}; use engine: auto to fall back to HF generate")
    if not reason:
        return "vllm"
    return _cpu_choice(device, model_name, new_tokens)


def _cpu_choice(device: str | None, model_name: str | None, new_tokens: int | None = None) -> str:
    """`auto` without vLLM: on CPU with CTranslate2 installed, the engine the probe found faster
    (for a small job: the answer already known, else HF, without probing)."""
    if not _on_cpu(device) or importlib.util.find_spec("ctranslate2") is None:
        return "hf"
    from .engine_probe import PROBE_PAYS_FROM, faster_cpu_engine, forced_engine, known_cpu_engine

    if model_name is None:
        return forced_engine() or "ct2"
    if new_tokens is not None and new_tokens < PROBE_PAYS_FROM:
        return known_cpu_engine(model_name) or "hf"
    return faster_cpu_engine(model_name)


def check_local_engine(engine: str) -> str:
    """The `engine` of a model held in-process (`heedful serve`, the LLM client), or a clear error:
    vLLM -- one engine per batch job, which owns the GPU -- is no choice there (config validators
    call this, so the refusal comes when the config is read)."""
    if engine == "vllm":
        raise ValueError(
            "engine: vllm is for the batch stages (generate); a model held in-process (serve, the LLM "
            "client) takes auto, hf or ct2 -- for vLLM, run vLLM's own server and use kind: openai"
        )
    return engine


def pick_local_engine(
    engine: str = "auto", device: str | None = None, model_name: str | None = None, new_tokens: int | None = None
) -> str:
    """'ct2' or 'hf' for a model held in this process and called many times (`heedful serve`, the
    LLM client): like `pick_engine` without vLLM (`check_local_engine`): 'auto' means the faster
    of CTranslate2 and HF generate on this CPU (measured once per host and model), else HF.
    `new_tokens`: the most the holder will ask for (a stage's simulated conversations), when it
    knows; a job too small to repay the probe takes the known answer or HF, as in `pick_engine`."""
    check_local_engine(engine)
    if engine == "auto":
        return _cpu_choice(device, model_name, new_tokens)
    return pick_engine(engine, device)


#: `heedful serve`'s engines: the stages' local ones, and both at once (lone requests and streams on
#: CTranslate2, micro-batches on HF: where each is faster, pipeline/engine_probe.py `serving_cpu_engine`)
ServeEngine = Literal["auto", "hf", "ct2", "hf+ct2", "vllm"]
ServeEngineSetting = Annotated[
    ServeEngine,
    Field(
        description="auto: on CPU what the engine probe found faster here (measured once per host and model): "
        "ct2, hf, or hf+ct2 (lone requests and streams on CTranslate2, micro-batches on HF); hf; ct2; hf+ct2"
    ),
]


def pick_serving_engine(engine: str = "auto", device: str | None = None, model_name: str | None = None) -> str:
    """'hf', 'ct2' or 'hf+ct2' for `heedful serve`: like `pick_local_engine`, and on a CPU `auto` may
    answer 'hf+ct2' (the probe found CTranslate2 faster for a lone request only); 'hf+ct2' insists
    (CPU only, CTranslate2 installed). `auto` considers both only while CTranslate2's fp32 copy fits
    in half of the memory left beside HF's (pipeline/host_memory.py), else gives the stages' answer."""
    check_local_engine(engine)
    if engine == "hf+ct2":
        if not _on_cpu(device):
            raise RuntimeError(f"engine: hf+ct2 runs on a CPU (device {device or 'auto'} has a GPU); use hf")
        pick_engine("ct2", device)  # a clear error when CTranslate2 cannot run
        return engine
    if engine != "auto" or not _on_cpu(device) or importlib.util.find_spec("ctranslate2") is None or model_name is None:
        return pick_local_engine(engine, device, model_name)
    from .engine_probe import serving_cpu_engine
    from .host_memory import fp32_bytes, room_for
    from .models import resolve_model
    from .precision import cpu_precision

    # asked before the probe, which itself holds both engines: no room, the stages' answer
    fp32 = fp32_bytes(resolve_model(model_name)) or 0
    hf = fp32 // 2 if cpu_precision() == "bfloat16" else fp32
    if not room_for(fp32, "CTranslate2's copy beside HF", besides=hf):
        return pick_local_engine(engine, device, model_name)
    return serving_cpu_engine(model_name)


def _on_cpu(device: str | None) -> bool:
    """Whether local generation would run on the CPU (no device asked for and no GPU, or 'cpu')."""
    if device is not None:
        return device == "cpu"
    import torch

    return not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


class LocalEngine:
    """One way to sample from a local model, whatever the engine: HF `generate` on a loaded
    model, or CTranslate2 on the same weights (adapter merged). Stages that sample in
    batches (and resume batch by batch) hold one and call `generate` per batch. A
    Chain-of-Hindsight adapter's replies open with its phrase on either (pipeline/hindsight.py)."""

    def __init__(self, model_name: str, adapter: str | Path | None = None, engine: str = "hf", device: str | None = None):
        from .hindsight import adapter_phrase

        self.engine = engine
        self.phrase = adapter_phrase(adapter)  # a bad coh.json fails here, before the model loads
        if engine == "ct2":
            from .ct2_engine import Ct2Generator

            self.ct2 = Ct2Generator(model_name, adapter)
        else:
            from .models import device_policy, load_causal_lm, load_tokenizer

            self.tokenizer = load_tokenizer(model_name)
            self.model = load_causal_lm(model_name, device_policy(device), adapter=adapter).eval()

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingSettings,
        num_samples: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[list[Completion]]:
        from .hindsight import answered_after

        def sample(suffix: str) -> list[list[Completion]]:
            if self.engine == "ct2":
                return self.ct2.generate(
                    conversations,
                    sampling,
                    num_samples=num_samples,
                    seed=seed,
                    batch_size=batch_size,
                    on_batch=on_batch,
                    prompt_suffix=suffix,
                )
            return chat_generate(
                self.model, self.tokenizer, conversations, sampling, num_samples, batch_size, seed, on_batch, suffix
            )

        return answered_after(self.phrase, sample, self.ct2.tokenizer if self.engine == "ct2" else self.tokenizer)


def generate_chat(
    model_name: str,
    conversations: list[Messages],
    sampling: SamplingSettings,
    *,
    adapter: str | Path | None = None,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    engine: str = "auto",
    device: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[Completion]]:
    """Sample `num_samples` replies per conversation with vLLM, CTranslate2 or HF generate (see `pick_engine`)."""
    chosen = pick_engine(engine, device, model_name)
    if chosen == "vllm":
        return vllm_generate(
            model_name, conversations, sampling, num_samples=num_samples, seed=seed, adapter=adapter, on_batch=on_batch
        )
    local = LocalEngine(model_name, adapter, chosen, device)
    return local.generate(conversations, sampling, num_samples, batch_size, seed, on_batch)


def vllm_generate(
    model_name: str,
    conversations: list[Messages],
    sampling: SamplingSettings,
    *,
    num_samples: int = 1,
    seed: int = 0,
    adapter: str | Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    gpu_memory_utilization: float = 0.85,
) -> list[list[Completion]]:
    """All prompts in one vLLM call (it batches continuously); a LoRA adapter via LoRARequest, a
    Chain-of-Hindsight one after its phrase (pipeline/hindsight.py)."""
    from vllm import LLM, SamplingParams

    from .hindsight import adapter_phrase, answered_after
    from .models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(model_name)
    prompts = render_many(tokenizer, conversations)
    eos_ids = eos_ids_from_tokenizer(tokenizer)
    llm_kwargs: dict[str, Any] = dict(
        model=resolve_model(model_name), seed=seed, dtype="auto", gpu_memory_utilization=gpu_memory_utilization
    )
    lora_request = None
    if adapter is not None:
        from vllm.lora.request import LoRARequest

        llm_kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(adapter_rank(adapter)))
        lora_request = LoRARequest("heedful-adapter", 1, str(adapter))
    llm = LLM(**llm_kwargs)
    params = SamplingParams(**vllm_sampling_kwargs(sampling, num_samples, seed, eos_ids))

    def sample(suffix: str) -> list[list[Completion]]:
        outputs = llm.generate([p + suffix for p in prompts], params, lora_request=lora_request)
        if on_batch is not None:
            on_batch(1, 1)
        return completions_from_vllm(outputs, eos_ids)

    return answered_after(adapter_phrase(adapter), sample, tokenizer)


def vllm_sampling_kwargs(sampling: SamplingSettings, num_samples: int, seed: int, eos_ids: list[int]) -> dict[str, Any]:
    """Our SamplingSettings as vLLM SamplingParams keywords (temperature 0: greedy, like HF)."""
    greedy = sampling.temperature == 0
    return {
        "n": num_samples,
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": -1 if greedy or sampling.top_k == 0 else sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "seed": seed,
        "stop_token_ids": list(eos_ids),
        "skip_special_tokens": True,
    }


def completions_from_vllm(request_outputs, eos_ids: list[int]) -> list[list[Completion]]:
    """vLLM RequestOutputs -> Completions; token counts exclude the stop token, as on the HF path."""
    out = []
    for request in request_outputs:
        replies = []
        for sample in request.outputs:
            tokens = list(sample.token_ids)
            finished = sample.finish_reason == "stop"
            if finished and tokens and tokens[-1] in eos_ids:
                tokens = tokens[:-1]
            replies.append(Completion(sample.text.strip(), len(tokens), finished))
        out.append(replies)
    return out


def eos_ids_from_tokenizer(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus those in the model's generation config (when it has one)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        config = GenerationConfig.from_pretrained(tokenizer.name_or_path)
        extra = config.eos_token_id
        ids.update([extra] if isinstance(extra, int) else (extra or []))
    except OSError:
        pass
    return sorted(ids)
