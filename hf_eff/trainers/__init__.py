"""TRL trainers: GRPO with prefix grouping, DPO with extra loss variants (needs the `trl` extra)."""

from __future__ import annotations

from hf_eff.lazy import lazy_exports

# Each name is imported from its module on first access, so `import hf_eff.trainers` stays cheap and a missing `trl`
# is reported by the module that needs it.
_ATTRIBUTE_MODULES = {
    "GRPOConfig": "hf_eff.trainers.grpo",
    "GRPOTrainer": "hf_eff.trainers.grpo",
    "DPOConfig": "hf_eff.trainers.dpo",
    "DPOTrainer": "hf_eff.trainers.dpo",
    "register_dpo_loss": "hf_eff.trainers.dpo",
}

__all__ = sorted(_ATTRIBUTE_MODULES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTE_MODULES)
