"""The controllers compared in one run: the given policies, static limits, plain AIMD."""

from __future__ import annotations

from pathlib import Path

from controller.errors import PolicyError
from controller.policy.baselines import Baselines
from controller.policy.documents import AdaptiveLimit, DocumentFile, Limits, Plan
from controller.policy.policyset import PolicySet
from controller.reload import Confirmations, PolicyWatcher, ReloadOutcome
from controller.sim.scenario import PlainAimd

POLICIES, STATIC, AIMD = "policies", "static", "plain-aimd"


class FixedPolicies(PolicyWatcher):
    """A watcher over a policy set built in memory (it never changes)."""

    def __init__(self, policies: PolicySet) -> None:
        super().__init__(Path(f"<{policies.version}>"))
        self.current = policies

    def poll(self, confirmations: Confirmations | None = None) -> ReloadOutcome:
        return ReloadOutcome(changed=False)

    def load(self) -> PolicySet:
        assert self.current is not None
        return self.current


def static_limits(policies: PolicySet) -> PolicySet:
    """Only the Plans and the Limits document: every limit stays at its baseline."""
    kept = [d for d in policies.documents if isinstance(d, Plan | Limits)]
    return PolicySet.from_documents(kept, version=f"static-{policies.version}")


def plain_aimd(policies: PolicySet, spec: PlainAimd, setpoint: float) -> PolicySet:
    """The static set plus one textbook AIMD on `spec.target`: no band, no stabilization,
    no step limits; its bounds default to the Limits floor/ceiling, else 5%–100% of the
    baseline."""
    base = static_limits(policies)
    baseline = Baselines(base, {}).value(spec.target)
    floors, ceilings = base.limits.spec.floors, base.limits.spec.ceilings
    if baseline is None and (spec.max is None or spec.increase is None):
        raise PolicyError(
            f"plain AIMD target {spec.target} has no baseline in the policies; set "
            "plain_aimd.max and plain_aimd.increase in the scenario, or pick another target"
        )
    reference = baseline if baseline is not None else float(spec.max or 1.0)
    high = spec.max or ceilings.get(spec.target) or reference
    low = spec.min if spec.min is not None else floors.get(spec.target, 0.05 * reference)
    document = {
        "apiVersion": "governor/v1",
        "kind": "AdaptiveLimit",
        "metadata": {"name": "plain-aimd", "description": "textbook AIMD, for comparison"},
        "spec": {
            "target": str(spec.target),
            "signal": {"name": "utilization", "query": spec.signal, "stale_after": "60s"},
            "setpoint": setpoint,
            "algorithm": "aimd",
            "aimd": {
                "increase": spec.increase or 0.05 * reference,
                "decrease_factor": spec.decrease_factor,
                "tolerance": 0,
            },
            "bounds": {"min": min(low, high), "max": high},
            "behavior": {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}},
        },
    }
    adaptive = DocumentFile(document=document).document
    assert isinstance(adaptive, AdaptiveLimit)
    return PolicySet.from_documents(
        [*base.documents, adaptive], version=f"plain-aimd-{policies.version}"
    )
