"""CTranslate2 as heedful's CPU generation engine (optional: `pip install ctranslate2`).

Why: on CPU, HF `generate` spends most of a small model's decoding step in Python and
framework overhead; CTranslate2 runs the same weights (converted once, fp32 by default so
greedy replies match HF's) in a C++ decoder with a KV cache and batch-level scheduling.
On top of it: the token prefix all prompts of a call share (the chat template's system
turn) is computed once and cached, and each request may have its own length budget inside
one call. `engine: auto` picks this engine on CPU; `bench/generate.py` measures it against
plain HF `generate` in one run (docs/generation.md).

A LoRA adapter is merged into the base before conversion (PEFT `merge_and_unload`), so the
converted model writes exactly what base+adapter writes. Conversions are cached under
`$HEEDFUL_HOME/ct2/<key>`, keyed by the model's and the adapter's file fingerprints, the
quantization and the CTranslate2 version; a lock and an atomic rename keep concurrent
stages from converting twice or reading half a folder. The cache is bounded
(`HEEDFUL_CT2_CACHE_GB`, least recently used out, never a conversion in use: `ct2_cache.py`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .chat import Messages, render_many
from .ct2_cache import MARKER, InUse, evict, mark_used
from .generation import Completion, SamplingSettings, hf_sampling_kwargs
from .prefix_logits import shared_prefix_length
from .threads import engine_threads

log = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "int8_float32", "int8")
#: a token prefix shared by every prompt of a call (the chat template's system turn) at least
#: this long is run once and its KV state reused (CTranslate2's static prompt cache)
MIN_CACHED_PREFIX = 8
#: across calls (a server's requests, `prefix_cache="across_calls"`): a prefix shared with the
#: previous request is cached in whole blocks of this many tokens, so requests that share a long
#: start (a system prompt, few-shot examples) and differ after it reuse one cached state
PREFIX_BLOCK = 64
#: at most this many distinct prefixes, and this many of their tokens in all, are cached across
#: calls; then the generator is reloaded (CTranslate2 keeps every cached prompt's state for the
#: generator's lifetime): a multi-turn chat, whose shared start grows every turn, cannot pile up
MAX_CACHED_PREFIXES = 8
MAX_CACHED_TOKENS = 4096
#: held from `ctranslate2.set_random_seed` until the generator it seeds has made its first call:
#: the seed is process-wide, and a new generator's worker thread reads it at its first decoding
#: step (its RNG is created then), not when the generator is built. Two engines in one process (a
#: server's canary beside its active version) could otherwise start one from the other's seed: a
#: seeded request's replies would not be its seed's, and an unseeded one's could be what another
#: request's seed predicts
_SEED_LOCK = threading.RLock()


def _step_callback(budgets: list[int], stop_strings: list[str], tokenizer: Any) -> Callable[[Any], bool]:
    """A CTranslate2 step callback that ends request i after budgets[i] generated tokens, or after
    the token that completes one of `stop_strings` in its text (as HF's `stop_strings` stops a row).

    Counts calls per request rather than reading `step`: steps also count the prompt tokens
    that ragged batches decode one by one, so they are offset per request."""
    counts = [0] * len(budgets)
    replies: list[list[int]] = [[] for _ in budgets]
    stop_strings = [s for s in stop_strings if s]

    def on_step(step: Any) -> bool:
        i = step.batch_id
        counts[i] += 1
        if counts[i] >= budgets[i]:
            return True
        if not stop_strings:
            return False
        replies[i].append(step.token_id)
        text = tokenizer.decode(replies[i], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    return on_step


def ct2_unavailable_reason() -> str | None:
    """None when the CTranslate2 engine can run here; otherwise why not."""
    if importlib.util.find_spec("ctranslate2") is None:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    return None


def _fingerprint_files(folder: Path, patterns: tuple[str, ...]) -> str:
    """Hash of names, sizes and mtimes of the weight/config files (cheap; rewrites change it)."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def converted_model(model_name: str, adapter: str | Path | None = None, quantization: str = "float32") -> InUse:
    """The CTranslate2 model for `model_name` (+ merged `adapter`), converted once, held in use.

    Its folder is `.folder`; the cache keeps it while the returned handle lives (or until
    `.release()`), and cuts older conversions back to the budget (`pipeline/ct2_cache.py`)."""
    import ctranslate2

    from .models import _build_once, resolve_model
    from .paths import heedful_home

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"ct2 quantization must be one of {', '.join(QUANTIZATIONS)} (got {quantization!r})")
    source = Path(resolve_model(model_name))
    if not source.is_dir():
        raise ValueError(f"the ct2 engine needs a local model folder; '{model_name}' resolved to {source}")
    key_parts = [
        str(source),
        _fingerprint_files(source, ("*.safetensors", "*.bin", "config.json")),
        quantization,
        ctranslate2.__version__,
    ]
    if adapter is not None:
        adapter = Path(adapter)
        key_parts += [str(adapter.resolve()), _fingerprint_files(adapter, ("adapter_model.*", "adapter_config.json"))]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    target = heedful_home() / "ct2" / key

    def build(staging: Path) -> None:
        _convert(source, _merged_model(model_name, adapter) if adapter is not None else None, staging, quantization)
        (staging / "heedful_ct2.json").write_text(
            json.dumps(
                {
                    "model": model_name,
                    "source": str(source),
                    "adapter": str(adapter.resolve()) if adapter else None,
                    "quantization": quantization,
                    "ctranslate2": ctranslate2.__version__,
                },
                indent=2,
            )
        )

    held = InUse(target)
    _build_once(target, build, marker=MARKER)
    mark_used(target)
    try:
        evict(target.parent, keep=target)
    except OSError as exc:  # a cache we may read but not prune (another user's): the conversion is fine
        log.warning("could not prune the CTranslate2 cache %s: %s", target.parent, exc)
    return held


def _merged_model(model_name: str, adapter: Path) -> Any:
    """base + LoRA as one fp32 HF model in memory (PEFT `merge_and_unload`)."""
    from .models import device_policy, load_causal_lm

    model = load_causal_lm(model_name, device_policy("cpu", precision="float32"), adapter=adapter)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _convert(source: Path, merged: Any, staging: Path, quantization: str) -> None:
    """CTranslate2's converter on the model folder `source`; with `merged` (base + adapter in
    memory) it converts that model instead of loading the folder's weights, so no merged copy is
    written and read back (config and tokenizer come from the base folder: a merge changes neither)."""
    import ctranslate2

    converter = ctranslate2.converters.TransformersConverter(str(source))
    if merged is not None:
        converter.load_model = lambda model_class, path, **kwargs: merged
    with _collections_skip_what_exists():
        converter.convert(str(staging), quantization=quantization, force=True)


@contextlib.contextmanager
def _collections_skip_what_exists() -> Iterator[None]:
    """Python's full garbage collections ignore the objects alive now, until the block ends.

    Why: CTranslate2's converter runs `gc.collect()` after every layer; with torch,
    transformers and a run's objects alive each full collection walks millions of objects --
    on SmolLM2-135M 30 collections were 7 s of a 9 s conversion. Frozen (`gc.freeze`), they
    walk only what the conversion itself made, which is still freed. Skipped where the process
    already froze its objects (Ray Serve replicas do at start-up): unfreezing would undo that."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def hf_greedy_reference(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, eos_ids: list[int]
) -> list[list[int]]:
    """What this engine must write: plain HF greedy `generate` on one left-padded batch of
    rendered prompts, each reply's token ids cut before its first stop token.

    Why here: the engine's claim is "the same greedy replies as HF" (the module docstring);
    the parity tests (tests/test_ct2_engine.py) check it against this and `bench/generate.py`
    times it as the HF arm and counts agreement with it, so both hold the engine to one
    reference, written as a user writes HF generation.
    """
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    greedy = hf_sampling_kwargs(SamplingSettings(max_new_tokens=max_new_tokens, temperature=0))
    with torch.no_grad():
        out = model.generate(
            **enc, **greedy, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids
        )
    replies = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
        replies.append(row[:cut])
    return replies


class Ct2Generator:
    """A loaded CTranslate2 generator with heedful's sampling settings and Completion records."""

    def __init__(
        self,
        model_name: str,
        adapter: str | Path | None = None,
        *,
        quantization: str = "float32",
        threads: int | None = None,
        prefix_cache: bool | Literal["across_calls"] = True,
    ):
        from .generation import eos_ids_from_tokenizer
        from .models import load_tokenizer

        self.tokenizer = load_tokenizer(model_name)
        #: the conversion, held in use while this generator lives (it reloads from the folder)
        self.conversion = converted_model(model_name, adapter, quantization)
        self.model_dir = self.conversion.folder
        self.quantization = quantization
        self.threads = threads or engine_threads()
        #: True: a call's prompts' shared start runs once (a job's batch); "across_calls": instead, the start
        #: shared by a call's prompts and the previous call's first prompt (a server's requests, one or a
        #: few per call); False: none
        self.prefix_cache = prefix_cache
        self._previous: list[str] | None = None
        self._cached_prefixes: set[tuple[str, ...]] = set()
        # the same end-of-turn ids the vLLM path stops on (tokenizer + the model's generation config)
        self.eos_tokens = self.tokenizer.convert_ids_to_tokens(eos_ids_from_tokenizer(self.tokenizer))
        self.generator: Any = None
        #: whether the generator's sampling RNG started from a known seed (not `reload(reseed=True)`)
        self._rng_known = True
        #: the generator has made no call yet: its worker's RNG is not seeded yet (`_SEED_LOCK`)
        self._undrawn = True

    def _seeded(self, seed: int | None, sample: bool = True) -> Any:
        """The generator for a call: sampling with a `seed`, its RNG freshly seeded to it; sampling
        without one, an RNG seeded from a random source; greedy (`sample` False), no RNG.

        CTranslate2 seeds a worker thread's RNG when the generator starts, not per call, so a
        seeded sampling call starts a new generator (a fraction of a second, from the page cache).
        Per-call seeds make a rerun -- or a run resumed at batch k -- sample the same replies.
        An unseeded call samples on from a generator reseeded at random, never one a seed started
        (the next replies of a seeded stream are predictable to whoever sent the seed) nor the
        first from a fixed seed (a restarted server would replay its unseeded replies).
        """
        import ctranslate2

        if sample and seed is not None:
            with _SEED_LOCK:
                self.generator = None
                ctranslate2.set_random_seed(seed)
                self.reload()
        elif self.generator is None or (sample and self._rng_known):
            self.reload(reseed=True)
        return self.generator

    @contextlib.contextmanager
    def _calling(self, seed: int | None, sample: bool) -> Iterator[Any]:
        """The generator for one call (`_seeded`), under `_SEED_LOCK` from its seed until the call
        is done when the generator is new: its worker's RNG is created from the process-wide seed at
        its first decoding step, so no other engine may set the seed before then. A generator that
        has called before holds its RNG: its calls run without the lock."""
        _SEED_LOCK.acquire()
        held = True
        try:
            generator = self._seeded(seed, sample)
            if not self._undrawn:
                _SEED_LOCK.release()
                held = False
            yield generator
            self._undrawn = False
        finally:
            if held:
                _SEED_LOCK.release()

    def generate_ids(
        self,
        prompts: list[str],
        sampling: SamplingSettings,
        *,
        num_samples: int = 1,
        seed: int | None = 0,
        max_batch_size: int = 64,
        max_new_tokens: list[int] | None = None,
        stop_strings: list[str] | None = None,
    ) -> list[list[list[int]]]:
        """Reply token ids (stop token excluded) for rendered prompts, `num_samples` per prompt.

        `seed` None samples on from the generator's current RNG state instead of reseeding it
        (a server's unseeded requests: no generator restart per call), a state drawn at random
        (`_seeded`).

        `max_new_tokens`, one per prompt, gives each request its own budget inside one call
        (a request that reaches it leaves the batch; the others go on); by default every
        prompt gets `sampling.max_new_tokens`. With more prompts than `max_batch_size`,
        CTranslate2 sorts them by length and runs them in chunks (less padding). A request whose
        text completes one of `stop_strings` leaves the batch after that token (its ids keep it).
        """
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        token_lists = [self.tokenizer.convert_ids_to_tokens(ids) for ids in encoded]
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts) or min(budgets, default=1) < 1:
            raise ValueError(f"max_new_tokens needs one budget >= 1 per prompt ({len(budgets)} for {len(prompts)} prompts)")
        kwargs: dict[str, Any] = dict(
            max_length=max(budgets, default=1),
            include_prompt_in_result=False,
            end_token=self.eos_tokens,
            max_batch_size=max_batch_size,
            num_hypotheses=num_samples,
            return_end_token=False,
            **self._sampling_kwargs(sampling),
        )
        if len(set(budgets)) > 1 or stop_strings:
            if num_samples > 1:
                raise ValueError("per-request max_new_tokens or stop strings need num_samples: 1")
            kwargs["callback"] = _step_callback(budgets, stop_strings or [], self.tokenizer)
        if sampling.temperature == 0 and num_samples > 1:
            raise ValueError("temperature 0 (greedy) gives one reply per prompt; set num_samples: 1")
        prefix = self._static_prefix(token_lists)  # may reload the generator (randomly reseeded)
        if prefix >= MIN_CACHED_PREFIX:
            kwargs.update(static_prompt=token_lists[0][:prefix], cache_static_prompt=True)
            token_lists = [tokens[prefix:] for tokens in token_lists]
        with self._calling(seed, sampling.temperature > 0) as generator:
            results = generator.generate_batch(token_lists, **kwargs)
        return [[list(ids)[:budget] for ids in result.sequences_ids] for result, budget in zip(results, budgets)]

    def _static_prefix(self, token_lists: list[list[str]]) -> int:
        """How many leading tokens of this call's prompts run as CTranslate2's cached static prompt.

        Within a call, the prompts' shared start. Across calls (`prefix_cache="across_calls"`), the
        start shared with the previous call's first prompt too, cut to whole `PREFIX_BLOCK`s so
        that requests differing only after a long common start hit one cache entry; at most
        `MAX_CACHED_PREFIXES` distinct entries and `MAX_CACHED_TOKENS` of theirs, then the generator
        reloads with an empty cache. The cached state is the model's on exactly those tokens, so a
        reply is the same with or without it (tested), whoever's request put it there."""
        if not self.prefix_cache or not token_lists:
            return 0
        if self.prefix_cache != "across_calls":
            return shared_prefix_length(token_lists)
        previous, self._previous = self._previous, token_lists[0]
        if previous is None:
            return 0
        prefix = shared_prefix_length([*token_lists, previous]) // PREFIX_BLOCK * PREFIX_BLOCK
        if prefix < MIN_CACHED_PREFIX or prefix > MAX_CACHED_TOKENS:
            return 0
        key = tuple(token_lists[0][:prefix])
        if key not in self._cached_prefixes:
            held = sum(len(k) for k in self._cached_prefixes)
            if len(self._cached_prefixes) >= MAX_CACHED_PREFIXES or held + prefix > MAX_CACHED_TOKENS:
                self.reload(reseed=True)
            self._cached_prefixes.add(key)
        return prefix

    def reload(self, reseed: bool = False) -> None:
        """A fresh generator (the same weights, from the page cache): frees every cached prefix.

        The old one is dropped first (never two models in memory). `reseed`: its sampling RNG from
        a fresh random seed: CTranslate2 seeds a new generator's threads from the last
        `set_random_seed`, so an unseeded server that reloads would otherwise replay old samples."""
        import random

        import ctranslate2

        self.generator = None
        with _SEED_LOCK:  # the process-wide seed and the generator it starts, with no other engine between
            if reseed:
                ctranslate2.set_random_seed(random.SystemRandom().randrange(1 << 31))
            self.generator = ctranslate2.Generator(
                str(self.model_dir), device="cpu", compute_type=self.quantization, intra_threads=self.threads, inter_threads=1
            )
        self._rng_known = not reseed
        self._undrawn = True
        self._cached_prefixes.clear()

    @staticmethod
    def _sampling_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
        """CTranslate2's decoding keywords for `sampling` (top_k 0: the whole distribution, as in HF)."""
        if sampling.temperature == 0:
            return {"sampling_topk": 1, "repetition_penalty": sampling.repetition_penalty}
        return {
            "sampling_topk": sampling.top_k or 0,
            "sampling_topp": sampling.top_p,
            "sampling_temperature": sampling.temperature,
            "repetition_penalty": sampling.repetition_penalty,
        }

    def stream_ids(self, prompt: str, sampling: SamplingSettings, *, seed: int | None = None) -> Iterator[int]:
        """Reply token ids of one rendered prompt as they are decoded (CTranslate2's
        `generate_tokens`), up to `sampling.max_new_tokens`, ending before a stop token.

        For streams and stop strings: the caller may stop iterating at any token (closing the
        iterator stops the decoding). `seed` None: no reseed (see `generate_ids`). No prefix
        cache here (a server's streamed, seeded and stop-string requests): only `generate_ids`
        reuses a start shared with the previous request.
        """
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        with self._calling(seed, sampling.temperature > 0) as generator:
            steps = generator.generate_tokens(
                tokens, max_length=sampling.max_new_tokens, end_token=self.eos_tokens, **self._sampling_kwargs(sampling)
            )
            first = next(steps, None)  # the first decoding step, where a new generator's RNG takes the seed
        stop_ids = set(self.tokenizer.convert_tokens_to_ids(self.eos_tokens))
        try:
            for step in itertools.chain([] if first is None else [first], steps):
                if step.token_id in stop_ids:
                    return
                yield step.token_id
        finally:
            steps.close()

    def generate_texts(
        self, prompts: list[str], sampling: SamplingSettings, *, num_samples: int = 1, seed: int = 0, max_batch_size: int = 64
    ) -> list[list[Completion]]:
        """Replies for already-rendered prompts (chat template applied, assistant turn open)."""
        out = []
        for samples in self.generate_ids(prompts, sampling, num_samples=num_samples, seed=seed, max_batch_size=max_batch_size):
            out.append(
                [
                    Completion(
                        self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), len(ids) < sampling.max_new_tokens
                    )
                    for ids in samples
                ]
            )
        return out

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingSettings,
        *,
        num_samples: int = 1,
        seed: int = 0,
        batch_size: int = 64,
        on_batch: Callable[[int, int], None] | None = None,
        prompt_suffix: str = "",
    ) -> list[list[Completion]]:
        """Chat conversations -> replies, `batch_size` conversations per call (progress per call);
        `prompt_suffix` opens the assistant turn, as `chat_generate`'s."""
        prompts = [text + prompt_suffix for text in render_many(self.tokenizer, conversations)]
        out: list[list[Completion]] = []
        n_batches = max(1, (len(prompts) + batch_size - 1) // batch_size)
        for b in range(n_batches):
            chunk = prompts[b * batch_size : (b + 1) * batch_size]
            if chunk:
                out.extend(
                    self.generate_texts(chunk, sampling, num_samples=num_samples, seed=seed + b, max_batch_size=batch_size)
                )
            if on_batch is not None:
                on_batch(b + 1, n_batches)
        return out
