"""heedful's own PPO: per-token (dense) rewards from several reward models, LoRA policy.

TRL removed its PPO (trl >= 1.13) and never took token-level rewards; OpenRLHF takes one
scalar per reply. The math lives in plain functions (`masked`, `gae`, `losses`,
`shaping`), apart from models (`policy`, `value`), sampling (`rollout`), state
(`checkpoint`) and the loop (`trainer`), so each piece is testable by hand.
"""
