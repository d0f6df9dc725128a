"""Importing hf_eff makes its adapters real PEFT methods: enum members, mappings, config round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from hf_eff.adapters import ADAPTER_METHODS
from hf_eff.integrations.peft import register_peft_methods


@pytest.mark.parametrize("method", ADAPTER_METHODS, ids=lambda m: m.name)
def test_methods_are_registered(method):
    peft_type = PeftType(method.name.upper())
    assert peft_type.name == peft_type.value == method.name.upper()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is method.config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is method.model_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == method.prefix == f"{method.name}_"
    assert method.config_cls().peft_type is peft_type


def test_registration_is_idempotent():
    members = list(PeftType)
    register_peft_methods()
    register_peft_methods()
    assert list(PeftType) == members


@pytest.mark.parametrize("method", ADAPTER_METHODS, ids=lambda m: m.name)
def test_config_round_trip_through_json(method, tmp_path):
    config = method.config_cls(r=6, lora_alpha=12, target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.name.upper()
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is method.config_cls
    assert loaded.to_dict() == config.to_dict()


def test_plain_import_registers_in_a_fresh_interpreter():
    code = "import hf_eff, peft; print(peft.PeftType.SHARELORA.value, peft.PeftType.LORAXS.value, peft.PeftType.BLOCKLORA.value)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["SHARELORA", "LORAXS", "BLOCKLORA"]
