"""Hot reload of the policy directory: poll the files' hashes, swap in a valid new set whole,
keep the last good set when the new one is broken."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from controller.errors import PolicyError
from controller.policy.loader import LocatedError, check_files, policy_files
from controller.policy.policyset import PolicySet


@dataclass(frozen=True)
class ReloadOutcome:
    """What one poll found: nothing new, a new set in force, or a rejected change."""

    changed: bool
    policies: PolicySet | None = None  # the new set, when it was accepted
    errors: tuple[LocatedError, ...] = ()
    previous_version: str | None = None

    @property
    def rejected(self) -> bool:
        return self.changed and self.policies is None


class PolicyWatcher:
    """Holds the policy set in force; `poll()` reloads it when the files changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fingerprint: str | None = None
        self._rejected: str | None = None  # don't report the same broken content every tick
        self.current: PolicySet | None = None

    def load(self) -> PolicySet:
        """The first load: a broken directory here is a start-up error (raise)."""
        outcome = self.poll()
        if self.current is None:
            lines = "\n".join(str(e) for e in outcome.errors) or "no policy files"
            raise PolicyError(
                f"cannot start: the policies in {self.directory} are invalid:\n{lines}"
            )
        return self.current

    def poll(self) -> ReloadOutcome:
        """Reload if any policy file was added, removed or changed since the last poll."""
        try:
            files = policy_files(self.directory)
            fingerprint = _fingerprint(files)
        except (PolicyError, OSError) as exc:
            error = LocatedError(str(self.directory), 1, 1, "", str(exc))
            return self._reject(f"error:{exc}", (error,))
        if fingerprint == self._fingerprint:
            return ReloadOutcome(changed=False)
        if fingerprint == self._rejected:
            return ReloadOutcome(changed=False)
        policies, errors = check_files(files, self.directory)
        if policies is None:
            return self._reject(fingerprint, tuple(errors))
        previous = self.current.version if self.current else None
        self.current, self._fingerprint, self._rejected = policies, fingerprint, None
        return ReloadOutcome(changed=True, policies=policies, previous_version=previous)

    def _reject(self, fingerprint: str, errors: tuple[LocatedError, ...]) -> ReloadOutcome:
        if fingerprint == self._rejected:
            return ReloadOutcome(changed=False)
        self._rejected = fingerprint
        return ReloadOutcome(
            changed=True,
            errors=errors,
            previous_version=self.current.version if self.current else None,
        )


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
