"""diffusers components: Immiscible Diffusion noise assignment, plugin schedulers, distillation, preference losses."""

from __future__ import annotations

import importlib.util

from hf_eff.lazy import lazy_exports


def _is_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a parent package missing, or an entry of None in sys.modules
        return True


# The whole subpackage builds on the `diffusers` extra; say so once, here, instead of failing deep in a submodule.
_MISSING = [name for name in ("diffusers", "scipy") if _is_missing(name)]
if _MISSING:
    raise ImportError(
        f"hf_eff.diffusion needs {' and '.join(_MISSING)}, which hf_eff installs with the diffusers extra: "
        'pip install "hf-eff[diffusers]"'
    )

# Each name is imported from its module on first access, so that importing one submodule (e.g. the noise
# assignment, which needs no diffusers classes) does not pay for importing diffusers' scheduler machinery.
_ATTRIBUTE_MODULES = {
    "immiscible_noise": "hf_eff.diffusion.noise",
    "add_immiscible_noise": "hf_eff.diffusion.noise",
    "FlowMatchVectorizedScheduler": "hf_eff.diffusion.schedulers",
    "ConsistencyDistiller": "hf_eff.diffusion.distill.consistency",
    "ReflowDistiller": "hf_eff.diffusion.distill.reflow",
    "SchedulerSampler": "hf_eff.diffusion.distill.sampling",
    "DiffusionDPO": "hf_eff.diffusion.preference",
    "InversionDPO": "hf_eff.diffusion.preference",
    "SelfNPO": "hf_eff.diffusion.preference",
    "ddim_invert": "hf_eff.diffusion.preference",
    "npo_sample": "hf_eff.diffusion.preference",
}

__all__ = sorted(_ATTRIBUTE_MODULES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTE_MODULES)
