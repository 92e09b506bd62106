"""Pack preference pairs as [prompt | chosen | rejected] rows with a 4D attention mask.

Why: TRL runs every pair as two padded sequences (prompt+chosen, prompt+rejected), so the
prompt is computed twice and short sequences are padded to the longest of the batch. Here
each pair is one unit `prompt + chosen + rejected`; the rejected tokens get the position ids
they would have right after the prompt (P, P+1, ...) and the mask lets them see the prompt
and each other, never the chosen tokens. Units are placed into rows first-fit-decreasing
with the row length of the longest unit, so several short pairs share a row (block-diagonal:
a unit never sees another unit) and nothing is padded beyond the longest unit.

The hidden state of the prompt's last token predicts the first token of both replies, so a
scored position is a (row, position, target token, sequence) tuple; sequence i < n is pair
i's chosen reply and n + i its rejected one, the order of TRL's concatenated batch.

Truncation is TRL's `keep_start` applied to prompt+reply: a reply keeps its first
`max_length - len(prompt)` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class Unit:
    """One pair, truncated: its three parts' token ids."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def truncate(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], max_length: int | None) -> Unit:
    """TRL's keep_start truncation of prompt+chosen and prompt+rejected, sharing the prompt."""
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    if max_length is not None:
        if len(prompt) >= max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens fills max_length={max_length}; no reply token is left")
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return Unit(prompt, chosen, rejected)


def place(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, no row longer than `capacity`."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(
    units: Sequence[Unit],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    share_rows: bool = True,
    capacity: int | None = None,
) -> dict[str, Any]:
    """Tensors for one packed batch of `units` (see the module docstring).

    `capacity`: the longest a row may be (at least, and by default, the longest unit's length).
    Units of unequal sizes (C3PO's pairs beside single replies) waste less in longer rows: the
    layers run on every position of every row, padding included.
    """
    n = len(units)
    lengths = [len(u) for u in units]
    capacity = max(capacity or 0, max(lengths))
    if pad_to_multiple_of:
        capacity = -(-capacity // pad_to_multiple_of) * pad_to_multiple_of
    rows = place(lengths, capacity) if share_rows else [[i] for i in range(n)]
    width = capacity if pad_to_multiple_of else max(sum(lengths[i] for i in row) for row in rows)

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # unit id per token (pads: a unique negative id each, so a pad attends only to itself and
    # never produces an all-masked row, whose softmax would be NaN) and the part it belongs to
    unit_id = -1 - torch.arange(len(rows) * width, dtype=torch.long).view(len(rows), width)
    part = torch.full((len(rows), width), PROMPT, dtype=torch.long)
    score_row: list[int] = []
    score_pos: list[int] = []
    score_target: list[int] = []
    score_seq: list[int] = []
    segments: list[list[tuple[int, int, int, int]]] = []
    for r, members in enumerate(rows):
        segments.append([])
        start = 0
        for i in members:
            u = units[i]
            p, c, k = len(u.prompt), len(u.chosen), len(u.rejected)
            segments[r].append((start, p, c, k))
            end = start + p + c + k
            input_ids[r, start:end] = torch.tensor(u.prompt + u.chosen + u.rejected)
            position_ids[r, start:end] = torch.cat([torch.arange(p + c), torch.arange(p, p + k)])
            unit_id[r, start:end] = i
            part[r, start + p : start + p + c] = CHOSEN
            part[r, start + p + c : end] = REJECTED
            # chosen token j is predicted at the position before it (the prompt's last for j=0)
            # (position, token) per scored token; with an empty prompt nothing predicts a reply's
            # first token, which TRL does not score either
            first = [start + p - 1] if p else []
            chosen = list(zip(first + [start + p + j - 1 for j in range(1, c)], u.chosen[1 - len(first) :]))
            rejected = list(zip(first + [start + p + c + j - 1 for j in range(1, k)], u.rejected[1 - len(first) :]))
            scored = chosen + rejected
            score_row += [r] * len(scored)
            score_pos += [pos for pos, _ in scored]
            score_target += [token for _, token in scored]
            score_seq += [i] * len(chosen) + [n + i] * len(rejected)
            start = end

    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]
    same_unit = unit_id[:, :, None] == unit_id[:, None, :]
    hides_chosen = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
    pair_mask = (same_unit & causal & ~hides_chosen).unsqueeze(1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "pair_mask": pair_mask,
        "score_row": torch.tensor(score_row, dtype=torch.long),
        "score_pos": torch.tensor(score_pos, dtype=torch.long),
        "score_target": torch.tensor(score_target, dtype=torch.long),
        "score_seq": torch.tensor(score_seq, dtype=torch.long),
        "segments": segments,
        "n_pairs": n,
        "num_tokens": sum(2 * len(u.prompt) + len(u.chosen) + len(u.rejected) for u in units),
    }


class PackedPreferenceCollator:
    """Collator for TRL's tokenized preference rows (prompt_ids, chosen_ids, rejected_ids and,
    when precomputed, ref_chosen_logps / ref_rejected_logps) into one packed batch."""

    def __init__(self, pad_token_id: int, max_length: int | None, pad_to_multiple_of: int | None = None, share_rows: bool = True):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.share_rows = share_rows

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        units = [truncate(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length) for e in examples]
        batch = pack(units, self.pad_token_id, self.pad_to_multiple_of, self.share_rows)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch


def attention_mask_for(pair_mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the model's attention takes: bool for SDPA (True: attend), an
    additive float mask (0 / dtype min) for eager. Others (flash-attention) take no 4D mask."""
    impl = attn_implementation or "sdpa"
    if impl == "sdpa":
        return pair_mask
    if impl == "eager":
        return torch.zeros(pair_mask.shape, dtype=dtype, device=pair_mask.device).masked_fill(~pair_mask, torch.finfo(dtype).min)
    raise ValueError(f"the packed DPO core needs sdpa or eager attention, not {impl!r}: set fast: false")
