"""ConvSim-style simulated users (Owoicho et al., SIGIR 2023) for heedful.

protocol.py   the multi-turn protocol, batched across conversations
prompts.py    short few-shot prompts (PROMPT_VERSION) a 135M model can follow
needs.py      simulated users from needs JSONL, generate's responses or a ClariQ TSV
records.py    transcripts -> feedback records with provenance
quality.py    clarifying-answer quality vs real ClariQ answers (MiniLM similarity)
annotators.py the simulator's judgments as annotation functions (Argilla annotate hook)

The simulator's LLM is `pipeline.llm` (local HF model or OpenAI-compatible endpoint) behind
`pipeline.llm_cache.CachedLLM`.
"""
