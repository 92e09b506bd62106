"""deploy: hot-load the gated candidate into a running `heedful serve`, or record why not.

Why a stage: deploying is the last step of a loop round and must be as resumable as the
others. It acts only on a passed gate decision; a failed candidate stays in the run folder for
inspection and `deployment.json` says why it was not deployed. Calling the server twice with
the same adapter is a no-op there (versions are content-addressed), so a rerun after a crash
between "the server switched" and "the stage committed" does nothing twice, and the server is
always on the old or the new version: it loads the new one off to the side and swaps a
reference (serving/versions.py).

With `canary.share`, the candidate first serves that share of users (stable hash); the stage
waits until both versions have `min_reactions` live reactions (or `timeout_s`), then promotes
the candidate if its love rate is no worse than the current one's by more than `tolerance`,
else drops it. Without enough reactions by the timeout it drops it: promotion needs evidence.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.paths import ConfigPath
from pipeline.stage import Input, Output, Stage, StageConfig


class CanarySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float = Field(gt=0, lt=1, description="share of users (by stable hash) served by the candidate")
    min_reactions: int = Field(default=20, ge=1, description="live reactions each version needs before deciding")
    tolerance: float = Field(default=0.0, ge=0, description="promote if candidate love rate >= current - tolerance")
    timeout_s: float = Field(default=3600, gt=0)
    poll_s: float = Field(default=5, gt=0)


class DeployConfig(StageConfig):
    url: str = Field(description="the server, e.g. http://127.0.0.1:8000")
    token_file: ConfigPath | None = Field(default=None, description="admin token file, mode 0600 (else $HEEDFUL_TOKEN)")
    canary: CanarySettings | None = None

    def credential_fields(self) -> tuple[str, ...]:
        """Where the admin token is read: not part of what the stage computes (pipeline/fingerprint.py)."""
        return ("token_file",)


class DeployStage(Stage):
    uses = "deploy"
    summary = "Hot-deploy a gated adapter to a running heedful serve (optionally as a canary first)."
    Config = DeployConfig
    inputs = {
        "package": Input(("export", "adapter"), doc="the candidate adapter (an export folder)"),
        "decision": Input(("gate_decision",), required=False, doc="the gate's decision; without one: deploy"),
    }
    outputs = {"deployment": Output("deployment", doc="JSON: deployed or not, why, the version before and after")}

    def run(self):
        from pipeline.artifacts import atomic_write_json

        cfg: DeployConfig = self.config
        decision_path = self.ctx.input("decision")
        decision = json.loads(decision_path.read_text(encoding="utf-8")) if decision_path else {"passed": True, "reasons": []}
        result = self.act(cfg, Path(self.ctx.input("package")), decision)
        out = self.ctx.output("deployment")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "deployment.json", result)
        self.ctx.log.info("%s", result["why"])
        return {"deployed": result["deployed"], "version": result.get("version")}

    def act(self, cfg: DeployConfig, adapter: Path, decision: dict) -> dict:
        from serving.deploy_cli import active_version, deploy, read_token

        token = read_token(Path(cfg.token_file).expanduser() if cfg.token_file else None)
        before = active_version(cfg.url, token)[0]
        if not decision.get("passed"):
            why = "not deployed: the gate failed: " + "; ".join(decision.get("reasons") or [])
            return {"deployed": False, "why": why, "before": before, "version": before, "adapter": str(adapter)}
        if cfg.canary is None:
            version = (deploy(cfg.url, adapter, token).get("active") or {}).get("id")
            return {"deployed": True, "why": f"deployed {version}", "before": before, "version": version, "adapter": str(adapter)}
        from serving.versions import adapter_version_id

        if adapter_version_id(adapter) == before:
            # serving already: this stage promoted it and was stopped before it wrote its result (a
            # rerun resumes here), or it was deployed by hand. A canary of the active version is
            # refused by the server, so without this the round could never finish.
            why = f"{before} is the active version already (promoted before this stage was interrupted, or deployed by hand)"
            return {"deployed": True, "why": why, "before": before, "version": before, "adapter": str(adapter)}
        return self.canary(cfg, cfg.canary, adapter, token, before)

    def canary(self, cfg: DeployConfig, canary: CanarySettings, adapter: Path, token: str | None, before: str | None) -> dict:
        """Serve the candidate to a share of users; promote or drop it on their live reactions since it loaded."""
        from serving.deploy_cli import deploy, promote, rollback, version_stats

        loaded = deploy(cfg.url, adapter, token, canary=canary.share).get("canary") or {}
        candidate, since = loaded.get("id"), loaded.get("loaded_at")
        deadline = time.monotonic() + canary.timeout_s
        stats: dict[str, dict] = {}
        while True:
            stats = {row["version"]: row for row in version_stats(cfg.url, token, since=since)}
            cand, cur = stats.get(candidate or "", {}), stats.get(before or "", {})
            enough = all(int(s.get("reactions") or 0) >= canary.min_reactions for s in (cand, cur))
            if enough or time.monotonic() >= deadline:
                break
            time.sleep(canary.poll_s)
        rates = (
            f"love rate candidate {cand.get('love_rate')} (n={cand.get('reactions', 0)}) "
            f"vs current {cur.get('love_rate')} (n={cur.get('reactions', 0)}) since the canary loaded"
        )
        if enough and float(cand.get("love_rate") or 0) >= float(cur.get("love_rate") or 0) - canary.tolerance:
            promote(cfg.url, token)
            return {"deployed": True, "why": f"canary promoted: {rates}", "before": before, "version": candidate, "canary": stats}
        rollback(cfg.url, token)
        why = f"canary dropped: {rates}" if enough else f"canary dropped: too few reactions by the timeout ({rates})"
        return {"deployed": False, "why": why, "before": before, "version": before, "canary": stats}
