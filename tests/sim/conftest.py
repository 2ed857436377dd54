"""Fixtures for the simulator tests: small scenario files and a short policy directory (the
real redis-server of the Lua parity test comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
# The traces ship gzipped inside the package (read through importlib.resources by the code;
# here by path, to check what is in the repository).
AZURE_DATA = REPO / "controller" / "data" / "azure-llm-inference-2023"
AZURE_CONV = AZURE_DATA / "AzureLLMInferenceTrace_conv.csv.gz"

# A small fleet and eight minutes: a closed loop in about a second.
SHORT_SCENARIO = """
name: short
duration: 8m
tick: 15s
seed: 3
pools:
  - {name: inference, gpus: 4, batch_slots: 8, capacity_tokens_per_second: 20000}
tenants:
  - {name: ent, count: 6, plan: enterprise, model: gpt-4, rate: 1.2, ips: 2}
  - {name: paid, count: 3, plan: paid, model: gpt-3.5-turbo, rate: 0.02}
events:
  - {kind: burst, at: 1m, duration: 5m, factor: 4, tenants: [ent]}
"""


@pytest.fixture
def short_scenario(tmp_path: Path) -> Path:
    path = tmp_path / "short.yaml"
    path.write_text(SHORT_SCENARIO)
    return path
