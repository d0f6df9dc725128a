"""Step distillation for diffusers models: latent consistency distillation (LCM, LCM-LoRA) and rectified-flow reflow
(InstaFlow), as trainers with a `training_step(batch)` for a user's own accelerate loop (needs the `diffusers` extra)."""

from __future__ import annotations

from hf_eff.lazy import lazy_exports

# Imported on first access, so that importing the pure math in `functional` does not pay for diffusers' models.
_ATTRIBUTE_MODULES = {
    "ConsistencyDistiller": "hf_eff.diffusion.distill.consistency",
    "guidance_scale_embedding": "hf_eff.diffusion.distill.consistency",
    "ReflowDistiller": "hf_eff.diffusion.distill.reflow",
    "SchedulerSampler": "hf_eff.diffusion.distill.sampling",
    "sample_with_scheduler": "hf_eff.diffusion.distill.sampling",
    "diffusers_forward": "hf_eff.diffusion.distill.denoiser",
}

__all__ = sorted(_ATTRIBUTE_MODULES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTE_MODULES)
