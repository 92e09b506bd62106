"""Numbers a reader can tell from noise: every metric as {value, n, lo, hi} with a 95% interval.

- rates (a share of n yes/no outcomes, a judge's preferences with ties counted half): the Wilson
  score interval, which stays inside [0, 1] and is honest at 0/n and n/n, where the normal
  approximation (and a bootstrap: every resample of 20/20 is 20/20) collapses to a point;
- a rate against another's on the same items: Newcombe's paired interval and McNemar's exact test;
  several seeds' mean against it: Newcombe's interval on the seed-averaged table (the same with one
  seed) and an exact permutation test; many such tests of one family: Holm's adjusted p-values;
- means (KL, log-likelihood, rounds, lengths, scores): a seeded percentile bootstrap over the items;
- distributions: KL(p || q) in nats; per-token KL between two models' logits.

No interval claims a certainty the data cannot give. A percentile bootstrap whose resamples show
no spread (every value equal, or one item) would read `x [x, x]`; instead (`no_spread`) a mean of
values known to lie in [a, b] (`bounds`: repeated n-gram shares in [0, 1], rounds in [1, max_rounds])
gets the Wilson interval of its share of that range over its n items (a value in [0, 1] varies at
most as much as a yes/no outcome of the same mean, so this errs wide), and an unbounded mean (KL,
log-likelihood, a reward score, a length ratio) gets NaN bounds (null in JSON): no interval, with
`interval` saying why. Exact by construction, and so zero-width: the base against itself
(its `kl_to_base` 0, drift.py; its `length_vs_base` 1, evaluation/metrics.py).

Pure Python + numpy (torch only inside `token_kl`), so the spine and the report can use it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def estimate(value: float, n: int, lo: float, hi: float) -> dict[str, Any]:
    """The one shape of a reported metric."""
    return {"value": float(value), "n": int(n), "lo": float(lo), "hi": float(hi)}


def empty(n: int = 0) -> dict[str, Any]:
    """No data: a NaN value (JSON-safe as null via `clean`)."""
    return estimate(math.nan, n, math.nan, math.nan)


#: relative width under which a bootstrap interval counts as no spread (float rounding of equal means)
SPREAD_TOLERANCE = 1e-9


def z_for(level: float) -> float:
    """The two-sided normal quantile of a `level` interval (Z95 at 0.95)."""
    if level == 0.95:
        return Z95
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def wilson(successes: float, n: int, z: float = Z95) -> dict[str, Any]:
    """Share `successes / n` with its Wilson score interval (Wilson 1927). `successes` may be
    fractional (a judge's tie counts half a win): a value in [0, 1] varies at most as a yes/no
    outcome of the same mean does, so the interval is then a little wide, never too narrow."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson: need 0 <= successes <= n (got {successes}/{n})")
    if n == 0:
        return empty(0)
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # clamped so lo <= p <= hi also where rounding leaves e.g. lo = 5e-17 above p = 0
    return estimate(p, n, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def rate(outcomes: Iterable[bool]) -> dict[str, Any]:
    values = [bool(v) for v in outcomes]
    return wilson(sum(values), len(values))


def bootstrap_mean(
    values: Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Mean with a seeded percentile-bootstrap interval (NaNs dropped). Values all equal, or one
    value: no spread to resample, so `no_spread` (with `bounds`, the values' known range [a, b]: a
    Wilson interval within it; else NaN bounds), never a point interval."""
    import numpy as np

    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return empty(0)
    point = float(data.mean())
    return _bootstrap(point, int(data.size), lambda idx: data[idx].mean(axis=1), level, resamples, seed, bounds)


def bootstrap_ratio(
    numerators: Sequence[float], denominators: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """sum(numerators) / sum(denominators) over paired items (a ratio of means), with a seeded
    percentile-bootstrap interval that resamples the pairs together. No pairs or a zero
    denominator: an empty estimate. Every pair in the same ratio (or one pair): NaN bounds
    (`no_spread`), not a point interval."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.size == 0 or num.size != den.size or den.sum() <= 0:
        return empty(int(num.size))

    def ratios(idx):
        sums = den[idx].sum(axis=1)
        return np.where(sums > 0, num[idx].sum(axis=1) / np.where(sums > 0, sums, 1.0), np.nan)

    return _bootstrap(float(num.sum() / den.sum()), int(num.size), ratios, level, resamples, seed)


def _bootstrap(
    point: float, n: int, statistic, level: float, resamples: int, seed: int, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """`point` with a seeded percentile-bootstrap interval over `n` items: `statistic` maps a
    [resamples, n] matrix of resampled item indices to one value per resample (NaN: left out,
    e.g. a resample whose denominator is 0). No spread among the resamples (one item, or every
    item alike): `no_spread`."""
    import numpy as np

    if n > 1:
        values = statistic(np.random.default_rng(seed).integers(0, n, size=(resamples, n)))
        values = values[~np.isnan(values)]
        if values.size:
            alpha = (1 - level) / 2
            lo, hi = (float(q) for q in np.quantile(values, [alpha, 1 - alpha]))
            if hi - lo > SPREAD_TOLERANCE * max(abs(lo), abs(hi)):
                return estimate(point, n, lo, hi)
    return no_spread(point, n, level, bounds)


def no_spread(point: float, n: int, level: float = 0.95, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """A mean over `n` items whose bootstrap resamples all gave `point` (every value equal, or one
    item). A percentile interval would be [point, point]: certainty that n alike items cannot give
    (20 replies without a loop say little about the 21st). With `bounds` (a, b), the values' known
    range: the Wilson interval of the mean's share of that range over n items (for values in [0, 1]
    it is at least as wide as the truth needs, as for a rate); without bounds nothing can be said of
    the spread: NaN bounds (null in JSON). `interval` says which."""
    if bounds is not None and bounds[1] <= bounds[0]:  # e.g. rounds with max_rounds 1: nothing else was possible
        return {**estimate(point, n, point, point), "interval": "exact: the values' range is one point"}
    if bounds is not None:
        a, b = bounds
        share = min(1.0, max(0.0, (point - a) / (b - a)))
        w = wilson(share * n, n, z_for(level))
        lo, hi = min(point, a + w["lo"] * (b - a)), max(point, a + w["hi"] * (b - a))
        return {**estimate(point, n, lo, hi), "interval": f"no spread: Wilson within [{a:g}, {b:g}]"}
    return {**estimate(point, n, math.nan, math.nan), "interval": "no spread: every value alike, no interval"}


def mcnemar_p(turned_yes: int, turned_no: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split of the discordant pairs at least as
    uneven as `turned_yes` vs `turned_no` if neither side were more likely (binomial, p = 1/2)."""
    n, k = turned_yes + turned_no, min(turned_yes, turned_no)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values from m tests of one family (same order as given):
    the k-th smallest is multiplied by m - k + 1 and never falls below the one before it. Why: the
    arena's head-to-head compares every pair of trained rows on one metric (15 pairs for 6 methods),
    where about one raw p < 0.05 in 20 is chance; an adjusted p < 0.05 keeps the chance of any false
    finding in that family below 5%, without Bonferroni's full m-fold penalty on every test."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out = [1.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def paired_difference(outcomes: dict[str, bool], baseline: dict[str, bool], z: float = Z95) -> dict[str, Any]:
    """A yes/no rate against a baseline's on the *same* items (keys present in both): the
    difference of the shares with Newcombe's hybrid score interval for paired proportions (1998,
    method 10: the two Wilson intervals combined, corrected for the pairs' correlation), how many
    items turned yes (`turned_yes`) and no (`turned_no`), and the exact McNemar p-value. Why
    paired: two rates on the same 48 needs can each have a wide Wilson interval while the items
    they differ on all point one way; the pairing uses that, and says so when they do not. No
    shared items: an empty estimate."""
    shared = [k for k in outcomes if k in baseline]
    both = sum(bool(outcomes[k]) and bool(baseline[k]) for k in shared)
    turned_yes = sum(bool(outcomes[k]) and not baseline[k] for k in shared)
    turned_no = sum(not outcomes[k] and bool(baseline[k]) for k in shared)
    n = len(shared)
    counts = {"turned_yes": turned_yes, "turned_no": turned_no, "p": mcnemar_p(turned_yes, turned_no)}
    if n == 0:
        return {**empty(0), **counts}
    return {**newcombe(both, turned_yes, turned_no, n, z), **counts}


def newcombe(both: float, turned_yes: float, turned_no: float, n: int, z: float = Z95) -> dict[str, Any]:
    """A paired 2x2 table over `n` items (`both` yes on both sides, `turned_yes` only on the first,
    `turned_no` only on the second, the rest on neither): the first side's rate less the second's,
    with Newcombe's hybrid score interval (1998, method 10: the two Wilson intervals combined,
    corrected for the pairs' correlation). The cells may be fractional: a seed-averaged table
    (`paired_mean_difference`)."""
    yes1, yes2 = min(float(n), both + turned_yes), min(float(n), both + turned_no)  # float rounding of averaged cells
    neither = max(0.0, n - both - turned_yes - turned_no)
    p1, p2 = yes1 / n, yes2 / n
    w1, w2 = wilson(yes1, n, z), wilson(yes2, n, z)
    margins = yes1 * (turned_no + neither) * yes2 * (turned_yes + neither)
    cross = both * neither - turned_yes * turned_no
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    below = (p1 - w1["lo"]) ** 2 - 2 * phi * (p1 - w1["lo"]) * (w2["hi"] - p2) + (w2["hi"] - p2) ** 2
    above = (w1["hi"] - p1) ** 2 - 2 * phi * (w1["hi"] - p1) * (p2 - w2["lo"]) + (p2 - w2["lo"]) ** 2
    delta = p1 - p2
    lo, hi = max(-1.0, delta - math.sqrt(max(below, 0.0))), min(1.0, delta + math.sqrt(max(above, 0.0)))
    return estimate(delta, n, lo, hi)


def paired_mean_difference(per_seed: Sequence[dict[str, bool]], baseline: dict[str, bool]) -> dict[str, Any]:
    """Several seeds of one method against a baseline on the same items (keys every seed and the
    baseline have): per item, the share of seeds that said yes less the baseline's 0 or 1. The
    mean of those differences (the seeds of one item are not independent draws, so they are
    averaged first, not pooled as extra items) with Newcombe's paired interval (`newcombe`) on the
    seed-averaged table: an item whose two seeds split is half a yes; how many items' seed mean is
    above the baseline (`turned_yes`) and below it (`turned_no`), as a description; and `p` from
    the exact permutation test of the mean difference (`exchange_p`). With one seed: exactly
    `paired_difference` (value, interval and McNemar's p).

    Why Newcombe and not a bootstrap over the items: the differences are differences of rates, near
    a ceiling mostly 0, and a bootstrap of items that all agree with the baseline reads 0 [0, 0]
    (certainty that no number of items gives); each side's seed-averaged rate varies at most as a
    rate does, so the Wilson intervals Newcombe combines are, if anything, wide. Why not a sign test
    on the counts: an item whose two seeds split counts as much as one both seeds lost, so a method
    equal to its baseline on average can look better by the count alone. Why not sign flips of the
    differences: with k seeds against one baseline run an item's difference is lopsided (near a
    ceiling: often -1, rarely +k), and flipping it called an equal method different about twice as
    often as the level says."""
    if not per_seed:
        return {**empty(0), "turned_yes": 0, "turned_no": 0, "p": 1.0, "seeds": 0}
    seeds = len(per_seed)
    shared = [k for k in baseline if all(k in outcomes for outcomes in per_seed)]
    items = [(sum(bool(o[k]) for o in per_seed), int(bool(baseline[k]))) for k in shared]
    diffs = [yes / seeds - base for yes, base in items]
    turned_yes, turned_no = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    counts = {"turned_yes": turned_yes, "turned_no": turned_no, "p": exchange_p(items, seeds), "seeds": seeds}
    if not items:
        return {**empty(0), **counts}
    shares = [(yes / seeds, base) for yes, base in items]  # the seed-averaged 2x2 table, cell by cell
    both = sum(share * base for share, base in shares)
    up = sum(share * (1 - base) for share, base in shares)
    down = sum((1 - share) * base for share, base in shares)
    return {**newcombe(both, up, down, len(items)), **counts}


def finite_number(value: Any) -> bool:
    """A real number (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def paired_score_difference(
    per_seed: Sequence[Mapping[str, float]], baseline: Mapping[str, float], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Scores (a reward model's, the log-likelihood of a reference answer) against a baseline's on the
    same items (keys every seed and the baseline have): per item the seeds' mean less the baseline's
    score; the mean of those differences with a percentile bootstrap over the items (every difference
    alike, e.g. a method scoring as its baseline on every item: NaN bounds, `no_spread`), how many
    went up (`turned_yes`) and down (`turned_no`), and `p` from the sign-flip permutation test of the mean
    difference (`sign_flip_p`). Why sign flips here and not for yes/no outcomes (`exchange_p`): with
    one seed, a method equal to its baseline makes each item's difference as likely +d as -d, which
    is what the test assumes; a score is continuous, with no ceiling to make it lopsided. With several
    seeds averaged against one baseline run it is an approximation (the mean of k runs varies less)."""
    if not per_seed:
        return {**empty(0), "turned_yes": 0, "turned_no": 0, "p": 1.0, "seeds": 0}

    # a summary stores NaN / inf as null: such an item has no score to pair
    shared = [k for k in baseline if finite_number(baseline[k]) and all(finite_number(s.get(k)) for s in per_seed)]
    diffs = [sum(float(s[k]) for s in per_seed) / len(per_seed) - float(baseline[k]) for k in shared]
    counts = {
        "turned_yes": sum(d > 0 for d in diffs),
        "turned_no": sum(d < 0 for d in diffs),
        "p": sign_flip_p(diffs, seed=seed),
        "seeds": len(per_seed),
    }
    return {**bootstrap_mean(diffs, resamples=resamples, seed=seed), **counts}


def sign_flip_p(diffs: Sequence[float], exact_up_to: int = 16, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p of "the differences are symmetric about 0": the share of sign assignments whose
    sum is at least as far from 0 as the observed one, over all 2^n of them up to `exact_up_to` items,
    else `draws` seeded random ones (counting the observed, so p >= 1 / (draws + 1)), drawn 1,000 at
    a time so that thousands of items do not hold a draws x items matrix."""
    import itertools

    import numpy as np

    values = np.abs(np.asarray(diffs, dtype=float))
    if values.size == 0 or not values.any():
        return 1.0
    observed = abs(float(np.sum(diffs))) - 1e-12 * max(1.0, float(values.sum()))
    if values.size <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=values.size)))
        return float(np.mean(np.abs(signs @ values) >= observed))
    rng, total, hits = np.random.default_rng(seed), float(values.sum()), 0
    for start in range(0, draws, 1000):
        flipped = (rng.random((min(1000, draws - start), values.size)) < 0.5).astype(float)
        hits += int(np.sum(np.abs(total - 2.0 * (flipped @ values)) >= observed))
    return float((hits + 1) / (draws + 1))


def exchange_p(items: Sequence[tuple[int, int]], seeds: int) -> float:
    """Two-sided exact permutation p-value for "the method is the baseline": each item is
    (seeds that said yes, the baseline's 0 or 1), and under that null an item's seeds + 1 runs
    are exchangeable, so which of them is the baseline is a uniform draw. With y yes among the
    seeds + 1 runs, the item's step (seeds' yes less seeds × baseline) is y when the baseline is
    one of the no runs (chance (seeds + 1 - y) / (seeds + 1)) and y - 1 - seeds when it is a yes
    run. p is the chance that the items' steps sum at least as far from 0 as observed, counted
    exactly by convolution. With one seed the steps are ±1 on the discordant items and 0
    elsewhere: the exact McNemar test."""
    if seeds < 1:
        raise ValueError(f"exchange_p needs at least one seed, got {seeds}")
    observed = abs(sum(yes - seeds * base for yes, base in items))
    if observed == 0:
        return 1.0  # every outcome is at least as far from 0 (exactly, not up to float rounding)
    spread = seeds * len(items)
    chances = [0.0] * (2 * spread + 1)  # chances[t + spread]: P(the steps sum to t)
    chances[spread] = 1.0
    for yes, base in items:
        if not 0 <= yes <= seeds or base not in (0, 1):
            raise ValueError(f"exchange_p: an item is (seeds that said yes, baseline 0/1), got {(yes, base)}")
        total = yes + base
        if total in (0, seeds + 1):
            continue  # every run agrees: the step is 0 whichever run is the baseline
        moves = ((total, (seeds + 1 - total) / (seeds + 1)), (total - 1 - seeds, total / (seeds + 1)))
        after = [0.0] * len(chances)
        for t, chance in enumerate(chances):
            if chance:
                for step, weight in moves:
                    after[t + step] += chance * weight
        chances = after
    return min(1.0, float(sum(c for t, c in enumerate(chances) if abs(t - spread) >= observed - 1e-9)))


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) in nats between two discrete distributions (normalised here); inf where q=0<p."""
    if len(p) != len(q):
        raise ValueError(f"kl_divergence: distributions differ in length ({len(p)} vs {len(q)})")
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0 or any(x < 0 for x in p) or any(x < 0 for x in q):
        raise ValueError("kl_divergence: probabilities must be non-negative with a positive sum")
    total = 0.0
    for pi, qi in zip(p, q):
        pi, qi = pi / sp, qi / sq
        if pi == 0:
            continue
        if qi == 0:
            return math.inf
        total += pi * math.log(pi / qi)
    return total


def token_kl(logits_p, logits_q, mask=None):
    """Per-position KL(softmax(p) || softmax(q)) over the vocabulary: [B, T] -> [B, T] (torch).
    `mask` (same [B, T], 1 = count) zeroes positions that are not scored."""
    import torch

    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1)
    return kl if mask is None else kl * mask


# ----------------------------------------------------------------------------- text degeneration

_TOKEN = re.compile(r"\w+|[^\w\s]")


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of a reply's word n-grams that repeat an earlier one (0 = none; a loop -> near 1)."""
    tokens = _TOKEN.findall(text.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(Counter(grams)) / len(grams)


def peak_memory_mb() -> float:
    """Cost: this process's peak resident memory (and the GPU's peak allocation when there is one)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = rss / 1024 / (1024 if sys.platform == "darwin" else 1)
    try:
        import torch

        if torch.cuda.is_available():
            mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
    except ImportError:  # pragma: no cover
        pass
    return round(mb, 1)


def clean(obj: Any) -> Any:
    """NaN/inf -> None recursively, so JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj
