"""The demo end to end on a small budget: real all-MiniLM-L6-v2 on real IMDB reviews, every method."""

from __future__ import annotations

import json
import math

import pytest

from hf_eff import assets
from hf_eff.cli import main
from hf_eff.demo import DEMO_METHODS

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


def test_demo_compares_every_method(tmp_path, capsys):
    try:
        assets.minilm_path()
        assets.imdb_reviews("test", limit=1)
    except assets.AssetUnavailableError as error:
        pytest.skip(str(error))

    steps = 4
    arguments = ["demo", "--steps", str(steps), "--batch-size", "2", "--eval-size", "16", "--output-dir", str(tmp_path)]
    assert main(arguments) == 0

    table = capsys.readouterr().out
    for method in DEMO_METHODS.values():
        assert method.label in table
    assert "nan" not in table and "inf" not in table
    assert (tmp_path / "comparison.png").stat().st_size > 0

    results = json.loads((tmp_path / "results.json").read_text())
    by_name = {method["method"]: method for method in results["methods"]}
    assert list(by_name) == ["lora", "sharelora", "loraxs", "blocklora"]
    assert all(math.isfinite(number) for number in _numbers(results))
    assert by_name["loraxs"]["trainable_params"] < by_name["sharelora"]["trainable_params"]
    assert by_name["sharelora"]["trainable_params"] < by_name["lora"]["trainable_params"]
    assert by_name["lora"]["relative_step_time"] == 1.0
    assert 0.0 <= results["untrained_metric"] <= 1.0
    for name, method in by_name.items():
        assert 0.0 <= method["metric"] <= 1.0
        assert method["checkpoint_bytes"] > 0 and method["peak_memory_mib"] > 0
        assert len(method["losses"]) == steps
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()
