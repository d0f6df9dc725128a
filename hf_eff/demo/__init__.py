"""End-to-end demo: fine-tune a real model on real data with LoRA and each hf_eff adapter, and compare them."""

from .methods import DEMO_METHODS, AdapterSpec, DemoMethod
from .results import DemoResults
from .run import DemoSettings, run_demo
from .tasks import TASKS, Task
from .train import MethodResult

__all__ = [
    "DEMO_METHODS",
    "TASKS",
    "AdapterSpec",
    "DemoMethod",
    "DemoResults",
    "DemoSettings",
    "MethodResult",
    "Task",
    "run_demo",
]
