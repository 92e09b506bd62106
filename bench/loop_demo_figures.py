"""The loop demo's figures (bench/loop_demo.py), drawn from its results JSON, as SVG for docs/loop-demo.md.

loop_demo_rounds.svg: live users per users phase with the gate's decision after each round (a
rejected round in red, with its first reason), and the held-out evaluation the gate read (the
deployed version and the candidate, per round). loop_demo_versions.svg: per adapter version,
live users pooled over the phases it served beside the held-out satisfaction the gate measured.
Kept apart from the driver so `python bench/loop_demo.py --replot RESULTS` redraws them alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], folder: Path) -> list[Path]:
    """loop_demo_rounds.svg (live users per phase, gate decisions; held-out evaluation per round)
    and loop_demo_versions.svg (live users pooled per adapter version)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    labels = {v["version"]: v["label"].split()[0] for v in result["versions"]}
    phases, rounds = result["users_phases"], result["rounds"]

    def bars(est: dict[str, Any]) -> tuple[float, list[float]]:
        if est.get("value") is None:
            return float("nan"), [0.0, 0.0]
        v = float(est["value"])
        lo, hi = est.get("lo"), est.get("hi")
        return v, [max(0.0, v - (v if lo is None else lo)), max(0.0, (v if hi is None else hi) - v)]

    fig, (live, held) = plt.subplots(1, 2, figsize=(10.5, 4.0), gridspec_kw={"width_ratios": [3, 2]})
    xs = list(range(1, len(phases) + 1))
    for name, key_, color, dx in (
        ("users satisfied", "satisfied", "#4c72b0", -0.08),
        ("love rate (reactions)", "love_rate", "#dd8452", 0.08),
    ):
        values = [bars(p[key_]) for p in phases]
        live.errorbar(
            [x + dx for x in xs],
            [v for v, _ in values],
            yerr=[[e[0] for _, e in values], [e[1] for _, e in values]],
            fmt="-o",
            capsize=3,
            color=color,
            label=name,
        )
    for r in rounds:
        x = r["after_users_phase"] + 0.5
        if r.get("gate") is None:
            text, color = ("failed" if r.get("failed") else "no round"), "#9e9e9e"
        elif r.get("deployed"):
            text, color = f"round {r['round']}: passed,\ndeployed {labels.get(r['version_after'], '?')}", "#55a868"
        else:
            text, color = f"round {r['round']}: REJECTED\n({r['gate']['reasons'][0][:38]})", "#c44e52"
        live.axvline(x, color=color, linestyle="--", linewidth=1)
        live.text(x, 1.02, text, color=color, fontsize=7, ha="center", va="bottom")
    live.set_xticks(
        xs, [f"phase {p['phase']}\nserved {labels.get(p['version'], '?')}\n(n={p['users']})" for p in phases], fontsize=8
    )
    live.set_ylim(0, 1.0)
    live.set_ylabel("share (Wilson 95% interval)")
    live.set_title("Live: simulated users talking to heedful serve", fontsize=9, pad=26)
    live.grid(axis="y", alpha=0.3)
    live.legend(fontsize=7, loc="upper left")

    for r in rounds:
        gate = r.get("gate")
        if not gate:
            continue
        rule = next((x for x in gate["rules"] if x["metric"] == "satisfied"), None)
        if rule is None or rule.get("current") is None or rule.get("candidate") is None:
            continue
        (cv, ce), (nv, ne) = bars(rule["current"]), bars(rule["candidate"])
        held.errorbar([r["round"] - 0.1], [cv], yerr=[[ce[0]], [ce[1]]], fmt="s", color="#4c72b0", capsize=3)
        marker, color = ("o", "#55a868") if gate["passed"] else ("X", "#c44e52")
        held.errorbar([r["round"] + 0.1], [nv], yerr=[[ne[0]], [ne[1]]], fmt=marker, color=color, capsize=3, markersize=8)
        others = {x["metric"]: (x.get("candidate") or {}).get("value") for x in gate["rules"]}
        note = "\n".join(f"{m.replace('_to_base', '')} {v:.2g}" for m, v in others.items() if m != "satisfied" and v is not None)
        held.text(r["round"], 0.03, note, fontsize=6.5, ha="center", va="bottom", color=color)
    held.plot([], [], "s", color="#4c72b0", label="deployed version")
    held.plot([], [], "o", color="#55a868", label="candidate, gate passed")
    held.plot([], [], "X", color="#c44e52", label="candidate, gate rejected")
    ticks = [r["round"] for r in rounds]
    held.set_xticks(ticks, [f"round {t}" for t in ticks], fontsize=8)
    held.set_xlim(min(ticks, default=1) - 0.6, max(ticks, default=1) + 0.6)
    held.set_ylim(0, 1.3)
    held.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    held.set_title("Gate: held-out needs, satisfied at the first reply", fontsize=9)
    held.grid(axis="y", alpha=0.3)
    held.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"heedful loop demo: {result['model']} on CPU, simulated users ({result['simulator']})", fontsize=10)
    fig.tight_layout()
    rounds_svg = folder / "loop_demo_rounds.svg"
    fig.savefig(rounds_svg, format="svg")
    plt.close(fig)

    versions = [{**v, "held_out": held_out_of(v["version"], rounds)} for v in result["versions"]]
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    width = 0.27
    series = (
        ("live: users satisfied", "satisfied", "#4c72b0"),
        ("live: love rate", "love_rate", "#dd8452"),
        ("held-out: satisfied at the first reply (gate)", "held_out", "#8c8c8c"),
    )
    for j, (name, key_, color) in enumerate(series):
        values = [bars(v[key_] or {}) for v in versions]
        ax.bar(
            [i + (j - 1) * width for i in range(len(versions))],
            [v for v, _ in values],
            width,
            yerr=[[e[0] for _, e in values], [e[1] for _, e in values]],
            capsize=3,
            color=color,
            label=name,
        )
    ax.set_xticks(
        range(len(versions)),
        [f"{v['label']}\nphases {','.join(map(str, v['phases']))}\nn={v['satisfied']['n']} users" for v in versions],
        fontsize=8,
    )
    ax.set_ylim(0, 1.22)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("share (Wilson 95% interval)")
    ax.set_title("Per adapter version: live (pooled over the phases it served) and held-out", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    versions_svg = folder / "loop_demo_versions.svg"
    fig.savefig(versions_svg, format="svg")
    plt.close(fig)
    return [rounds_svg, versions_svg]


def held_out_of(version: str, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The held-out `satisfied` the gate measured for a served version: as the candidate it was
    deployed as, or (the first version) as the deployed one of the first round."""
    for r in rounds:
        gate = r.get("gate") or {}
        rule = next((x for x in gate.get("rules", []) if x["metric"] == "satisfied"), None)
        if rule is None:
            continue
        if r.get("deployed") and r.get("version_after") == version:
            return rule.get("candidate")
        if r.get("version_before") == version:
            return rule.get("current")
    return None
