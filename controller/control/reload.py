"""Hot reload of the policy directory: poll the files' hashes, swap in a valid new set whole,
keep the last good set when the new one is broken, and hold back a set that would remove many
limits at once until a person confirms that exact version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller.control.overrides import ReloadConfirmation
from controller.control.telemetry import repeat_due
from controller.errors import PolicyError
from controller.policy.loader import (
    LocatedError,
    Sources,
    check_sources,
    policy_files,
    read_sources,
)
from controller.policy.policyset import PolicySet, removed_limits

# Why a change was not taken (the `reason` label of governor_policy_reload_failures_total).
INVALID = "invalid"  # the files do not load as a complete set
REMOVAL = "removal"  # valid, but removes too many limits without a confirmation
ERROR = "error"  # the reload itself failed (a bug or the file system): never fails a tick

Confirmations = Callable[[str], ReloadConfirmation | None]


@dataclass(frozen=True)
class Removal:
    """Limits a new set would stop writing: more than `allowed` of the `total` in force."""

    version: str
    removed: tuple[str, ...]
    total: int
    allowed: float

    def explain(self, directory: Path) -> str:
        shown = ", ".join(self.removed[:10]) + (", ..." if len(self.removed) > 10 else "")
        return (
            f"policy set {self.version} would remove {len(self.removed)} of the {self.total} "
            f"limits in force ({shown}), over the {self.allowed:.0%} one reload may remove "
            f"(GOVERNOR_CONTROLLER__RELOAD_MAX_REMOVED_SHARE); if {directory} is what you "
            f"meant, run: governor policy confirm-reload {self.version} --reason '...'"
        )


@dataclass(frozen=True)
class ReloadOutcome:
    """What one poll found: nothing new, a new set in force, or a rejected change."""

    changed: bool
    policies: PolicySet | None = None  # the new set, when it was accepted
    errors: tuple[LocatedError, ...] = ()
    previous_version: str | None = None
    reason: str | None = None  # INVALID, REMOVAL or ERROR when rejected
    removal: Removal | None = None  # what a REMOVAL refusal held back
    # Polls in a row that each read other bytes than the one before (nothing is checked
    # until two agree): a directory rewritten at every poll never loads, and must say so.
    unsettled: int = 0
    confirmation: ReloadConfirmation | None = None  # who let a large removal in

    @property
    def rejected(self) -> bool:
        return self.changed and self.policies is None


# A change read differently by 3 polls in a row is no write in progress but a directory
# rewritten at every poll: said then, and again every 40 polls while it lasts.
UNSETTLED_WARN_AFTER = 3
UNSETTLED_REPEAT = 40


def unsettled_news(polls: int) -> bool:
    """Whether `polls` unsettled polls in a row is worth a warning now."""
    return repeat_due(polls, UNSETTLED_WARN_AFTER, UNSETTLED_REPEAT)


class PolicyWatcher:
    """Holds the policy set in force; `poll()` reloads it when the files changed."""

    def __init__(
        self, directory: Path, max_removed_share: float = 0.2, *, settle: bool = True
    ) -> None:
        self.directory = directory
        self.max_removed_share = max_removed_share
        self.settle = settle
        self._fingerprint: str | None = None
        self._pending: str | None = None  # a change read once, checked when read again
        self._rejected: str | None = None  # don't report the same broken content every tick
        self._held: PolicySet | None = None  # a valid set refused for removal, until confirmed
        self._unsettled_polls = 0
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

    def poll(self, confirmations: Confirmations | None = None) -> ReloadOutcome:
        """Reload if any policy file was added, removed or changed since the last poll.

        `confirmations(version)` gives the confirmation in force for a set that removes many
        limits. Never raises: whatever goes wrong keeps the set in force and is reported."""
        try:
            return self._poll(confirmations)
        except Exception as exc:  # the reload boundary: no failure here may fail a tick
            message = f"the policy reload failed ({type(exc).__name__}: {exc})"
            error = LocatedError(str(self.directory), 1, 1, "", message)
            return self._reject(f"error:{message}", (error,), ERROR)

    def _poll(self, confirmations: Confirmations | None) -> ReloadOutcome:
        try:
            sources = read_sources(policy_files(self.directory), self.directory)
        except (PolicyError, OSError) as exc:
            error = LocatedError(str(self.directory), 1, 1, "", str(exc))
            return self._reject(f"error:{exc}", (error,), INVALID)
        fingerprint = sources.fingerprint()
        if fingerprint == self._fingerprint:
            # Back to the set in force: the next break, even the same one, is news again.
            self._rejected, self._held, self._pending = None, None, None
            self._unsettled_polls = 0
            return ReloadOutcome(changed=False)
        if fingerprint == self._rejected:
            return self._confirmed_held(fingerprint, confirmations)
        if self._unsettled(fingerprint):
            self._unsettled_polls += 1
            return ReloadOutcome(changed=False, unsettled=self._unsettled_polls)
        self._unsettled_polls = 0
        return self._check(sources, fingerprint, confirmations)

    def _unsettled(self, fingerprint: str) -> bool:
        """A change is checked only once two polls in a row read the same bytes: a file
        written in place and read before its end is a prefix, and a prefix can be a valid
        set (limits.yaml cut before its floors and ceilings) that would be taken for a tick.
        The first load has no set to keep and takes what it reads."""
        if not self.settle or self.current is None:
            return False
        pending, self._pending = self._pending, fingerprint
        return pending != fingerprint

    def _check(
        self, sources: Sources, fingerprint: str, confirmations: Confirmations | None
    ) -> ReloadOutcome:
        """Validate the whole new set before anything of it is taken."""
        self._held = None
        policies, errors = check_sources(sources, complete=True)
        if policies is None:
            return self._reject(fingerprint, tuple(errors), INVALID)
        removal = self._removal(policies)
        if removal is None:
            return self._accept(policies, fingerprint, None)
        confirmation = _confirmation(confirmations, policies.version)
        if confirmation is not None:
            return self._accept(policies, fingerprint, confirmation)
        self._held = policies
        error = LocatedError(str(self.directory), 1, 1, "", removal.explain(self.directory))
        return self._reject(fingerprint, (error,), REMOVAL, removal)

    def _confirmed_held(
        self, fingerprint: str, confirmations: Confirmations | None
    ) -> ReloadOutcome:
        """The refused content again: taken once the held set's version is confirmed."""
        held = self._held
        confirmation = _confirmation(confirmations, held.version) if held else None
        if held is None or confirmation is None:
            return ReloadOutcome(changed=False)
        return self._accept(held, fingerprint, confirmation)

    def _removal(self, policies: PolicySet) -> Removal | None:
        if self.current is None:
            return None  # at start-up there is nothing to remove
        total = sum(1 for _ in self.current.baseline_addresses())
        removed = removed_limits(self.current, policies)
        if not removed or len(removed) <= self.max_removed_share * total:
            return None
        return Removal(
            policies.version, tuple(str(a) for a in removed), total, self.max_removed_share
        )

    def _accept(
        self, policies: PolicySet, fingerprint: str, confirmation: ReloadConfirmation | None
    ) -> ReloadOutcome:
        previous = self.current.version if self.current else None
        self.current, self._fingerprint = policies, fingerprint
        self._rejected, self._held, self._pending = None, None, None
        return ReloadOutcome(
            changed=True, policies=policies, previous_version=previous, confirmation=confirmation
        )

    def _reject(
        self,
        fingerprint: str,
        errors: tuple[LocatedError, ...],
        reason: str,
        removal: Removal | None = None,
    ) -> ReloadOutcome:
        if fingerprint == self._rejected:
            return ReloadOutcome(changed=False)
        self._rejected = fingerprint
        return ReloadOutcome(
            changed=True,
            errors=errors,
            previous_version=self.current.version if self.current else None,
            reason=reason,
            removal=removal,
        )


def _confirmation(confirmations: Confirmations | None, version: str) -> ReloadConfirmation | None:
    """The confirmation of exactly `version`, else None (also when it cannot be read)."""
    if confirmations is None:
        return None
    found = confirmations(version)
    return found if found is not None and found.version == version else None
