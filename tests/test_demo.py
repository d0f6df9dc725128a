"""The demo end to end on a small budget: real all-MiniLM-L6-v2 on real IMDB reviews, every method of both suites."""

from __future__ import annotations

import json
import math

import pytest

from hf_eff import assets
from hf_eff.cli import main
from hf_eff.demo import DEMO_METHODS, suite_methods

pytestmark = pytest.mark.slow


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.usefixtures("one_thread")  # the suite runs 2 workers on 2 cores; see tests/conftest.py
def test_demo_compares_every_method(tmp_path, capsys):
    try:
        assets.minilm_path()
        assets.imdb_reviews("test", limit=1)
    except assets.AssetUnavailableError as error:
        pytest.skip(str(error))

    steps = 3
    arguments = ["demo", "--steps", str(steps), "--batch-size", "2", "--eval-size", "4", "--output-dir", str(tmp_path)]
    assert main(arguments) == 0

    table = capsys.readouterr().out
    for method in DEMO_METHODS.values():
        assert method.label in table
    assert "nan" not in table and "inf" not in table

    adapters = _results(tmp_path / "adapters", steps)
    assert list(adapters) == list(suite_methods("adapters")) == ["lora", "sharelora", "loraxs", "blocklora"]
    assert adapters["loraxs"]["trainable_params"] < adapters["sharelora"]["trainable_params"]
    assert adapters["sharelora"]["trainable_params"] < adapters["lora"]["trainable_params"]
    assert adapters["lora"]["relative_step_time"] == 1.0
    for name, method in adapters.items():
        assert method["checkpoint_bytes"] > 0
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()

    optimizers = _results(tmp_path / "optimizers", steps)
    assert list(optimizers) == list(suite_methods("optimizers"))
    assert optimizers["adamw"]["relative_step_time"] == 1.0
    full_state = optimizers["adamw"]["optimizer_state_bytes"]
    trainable = optimizers["adamw"]["trainable_params"]
    # two fp32 moments per trained weight, plus torch's 4-byte step counter per tensor (MiniLM has ~100 tensors)
    assert 8 * trainable < full_state <= 8 * trainable + 4 * 200
    for name in ("galore", "galore8bit", "frugal"):
        assert optimizers[name]["optimizer_state_bytes"] < full_state, name
    assert optimizers["galore8bit"]["optimizer_state_bytes"] < optimizers["galore"]["optimizer_state_bytes"]
    for method in optimizers.values():
        assert method["checkpoint_bytes"] is None and method["trainable_params"] == trainable


def _results(directory, steps: int) -> dict:
    assert (directory / "comparison.png").stat().st_size > 0
    results = json.loads((directory / "results.json").read_text())
    assert all(math.isfinite(number) for number in _numbers(results))
    assert 0.0 <= results["untrained_metric"] <= 1.0
    for method in results["methods"]:
        assert 0.0 <= method["metric"] <= 1.0
        assert method["peak_memory_mib"] > 0 and method["optimizer_state_bytes"] > 0
        assert len(method["losses"]) == steps
    return {method["method"]: method for method in results["methods"]}
