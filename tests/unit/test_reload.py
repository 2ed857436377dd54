"""Hot reload (controller.control.reload) on real files: a set is validated whole before it is
taken, the last good set survives anything, a change broken again is reported again, and a reload
that removes more than the allowed share of limits waits for a confirmation of its version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.control.overrides import ReloadConfirmation
from controller.control.reload import (
    ERROR,
    INVALID,
    REMOVAL,
    UNSETTLED_REPEAT,
    UNSETTLED_WARN_AFTER,
    PolicyWatcher,
    unsettled_news,
)
from controller.model import LimitKind
from controller.policy.loader import check_directory, check_files, policy_files

SHIPPED = Path(__file__).parents[2] / "policies"
DEEP = (
    "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: deep}\nspec:\n"
    "  signals: {x: {query: up}}\n  when: '" + "!" * 500 + "(x > 1.0)'\n"
    "  actions: [{target: global/requests_per_second, scale: 0.5}]\n"
)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


@pytest.fixture
def watcher(policies: Path) -> PolicyWatcher:
    # Each change taken on its first poll: these tests are about what is taken, not when
    # (the test of a write caught mid-way below builds the watcher as the daemon does).
    started = PolicyWatcher(policies, settle=False)
    started.load()
    return started


def confirming(version: str) -> ReloadConfirmation:
    return ReloadConfirmation(version, "sre", "planned", 0.0, 3600.0)


def without_plan(policies: Path, plan: str) -> None:
    """Drop one plan document from plans.yaml, and the floors and ceilings that name it."""
    documents = (policies / "plans.yaml").read_text().split("---\n")
    kept = [d for d in documents if f"name: {plan}\n" not in d]
    (policies / "plans.yaml").write_text("---\n".join(kept))
    lines = (policies / "limits.yaml").read_text().splitlines(keepends=True)
    (policies / "limits.yaml").write_text("".join(li for li in lines if f"plan/{plan}/" not in li))


def test_an_emptied_directory_keeps_the_set_in_force(
    policies: Path, watcher: PolicyWatcher
) -> None:
    before = watcher.current
    for file in policies.iterdir():
        if file.is_dir():
            shutil.rmtree(file)  # policies/examples/
        else:
            file.unlink()

    outcome = watcher.poll()

    assert outcome.rejected
    assert outcome.reason == INVALID
    assert watcher.current is before
    assert {e.message.split(":")[0] for e in outcome.errors} == {"the policy set has no `kind"}
    assert watcher.poll().changed is False  # reported once


def test_a_hostile_file_is_rejected_and_reported_again_when_broken_again(
    policies: Path, watcher: PolicyWatcher
) -> None:
    before = watcher.current
    (policies / "deep.yaml").write_text(DEEP)

    first = watcher.poll()
    assert first.rejected
    assert first.reason == INVALID
    assert str(first.errors[0]).startswith(f"{policies / 'deep.yaml'}:6:9: spec.when:")
    assert watcher.poll().changed is False

    (policies / "deep.yaml").unlink()
    assert watcher.poll().changed is False  # back to the set in force
    (policies / "deep.yaml").write_text(DEEP)

    again = watcher.poll()
    assert again.rejected
    assert again.errors == first.errors
    assert watcher.current is before


def test_a_failure_inside_the_reload_keeps_the_set_and_is_reported_once(
    policies: Path, watcher: PolicyWatcher
) -> None:
    before = watcher.current
    without_plan(policies, "paid")  # 4 of 17 limits go: the confirmation store is asked

    def unreachable(version: str) -> ReloadConfirmation | None:
        raise ConnectionError("confirmation store unreachable")

    outcome = watcher.poll(unreachable)

    assert outcome.rejected
    assert outcome.reason == ERROR
    assert "ConnectionError: confirmation store unreachable" in outcome.errors[0].message
    assert watcher.current is before
    assert watcher.poll(unreachable).changed is False


def test_removing_up_to_the_share_reloads_and_more_waits_for_its_confirmation(
    policies: Path, watcher: PolicyWatcher
) -> None:
    assert watcher.current is not None
    total = sum(1 for _ in watcher.current.baseline_addresses())
    free = (policies / "plans.yaml").read_text()
    # Removing one limit of seventeen is under the 20 % share: taken without a word.
    (policies / "plans.yaml").write_text(free.replace("    tokens_per_day: 1000\n", ""))
    assert watcher.poll().policies is not None

    without_plan(policies, "enterprise")  # five more of sixteen: over the share
    held, _ = check_directory(policies, complete=True)
    assert held is not None
    refused = watcher.poll(lambda version: confirming("0123456789ab"))

    assert refused.rejected
    assert refused.reason == REMOVAL
    assert refused.removal is not None
    assert refused.removal.version == held.version
    assert refused.removal.total == total - 1
    assert refused.removal.removed == (
        "plan/enterprise/concurrent_requests",
        "plan/enterprise/concurrent_weight",
        "plan/enterprise/requests_per_minute",
        "plan/enterprise/tokens_per_day",
        "plan/enterprise/tokens_per_minute",
    )
    assert f"governor policy confirm-reload {held.version}" in refused.errors[0].message
    assert watcher.poll(lambda version: None).changed is False

    taken = watcher.poll(lambda version: confirming(version))

    assert taken.policies is not None
    assert taken.policies.version == held.version
    assert taken.confirmation == confirming(held.version)
    assert watcher.current is taken.policies


def test_the_share_is_a_setting(policies: Path) -> None:
    watcher = PolicyWatcher(policies, max_removed_share=0.5, settle=False)
    watcher.load()
    without_plan(policies, "enterprise")

    assert watcher.poll().policies is not None


@pytest.mark.parametrize("version", ["latest", "0123456789AB", "0123456789abc", ""])
def test_confirm_reload_refuses_anything_but_a_policy_version(version: str) -> None:
    result = CliRunner().invoke(
        app, ["policy", "confirm-reload", version, "--reason", "planned", "--actor", "sre"]
    )

    assert result.exit_code == 2
    assert "is not a policy version: give the 12 hex digits the refusal names" in result.stderr


def test_a_policy_file_turned_into_a_link_loop_is_rejected_naming_it(
    policies: Path, watcher: PolicyWatcher
) -> None:
    # It was skipped like a dangling ConfigMap link: the set reloaded without its policy.
    before = watcher.current
    looped = policies / "gpu-saturation.yaml"
    looped.unlink()
    looped.symlink_to("gpu-saturation.yml")
    (policies / "gpu-saturation.yml").symlink_to("gpu-saturation.yaml")

    outcome = watcher.poll()

    assert outcome.rejected
    assert outcome.reason == INVALID
    said = [str(error) for error in outcome.errors]
    assert {s.split(":", 1)[0] for s in said} == {str(looped), str(looped.with_suffix(".yml"))}
    assert all("a link loop" in s and "point it at a policy file, or remove it" in s for s in said)
    assert watcher.current is before


def test_a_policy_file_replaced_by_a_directory_is_rejected_naming_it(
    policies: Path, watcher: PolicyWatcher
) -> None:
    # A directory was skipped whatever its name: the set reloaded without the policy, as a
    # `policy.reloaded` at info level, and `policy lint` said ok.
    before = watcher.current
    replaced = policies / "gpu-saturation.yaml"
    replaced.unlink()
    replaced.mkdir()
    (replaced / "gpu-saturation.yaml").write_text((SHIPPED / "gpu-saturation.yaml").read_text())

    outcome = watcher.poll()

    assert outcome.rejected
    assert outcome.reason == INVALID
    [error] = outcome.errors
    assert str(error) == (
        f"{replaced}:1:1: the file is a directory: policies are plain files and subdirectories "
        "are not read; put the policy file back, or rename the directory (no .yaml/.yml)"
    )
    assert watcher.current is before
    lint = CliRunner().invoke(app, ["policy", "lint", str(policies)])
    assert lint.exit_code == 1, lint.output
    assert f"{replaced}:1:1: the file is a directory" in lint.output


def test_a_file_caught_mid_write_is_not_taken_until_two_polls_read_it_whole(
    policies: Path,
) -> None:
    watcher = PolicyWatcher(policies)  # as the daemon builds it
    before = watcher.load()
    limits = policies / "limits.yaml"
    edited = limits.read_text().replace("concurrent_requests: 300", "concurrent_requests: 280")
    # An in-place write (an editor, `cat >`, rsync --inplace) read before its end: the prefix
    # is a valid set, without the floors and ceilings that bound every limit.
    limits.write_text(edited[: edited.index("  floors:")])
    torn, errors = check_directory(policies, complete=True)
    assert torn is not None, errors
    assert not torn.limits.spec.floors

    assert watcher.poll().changed is False
    assert watcher.current is before

    limits.write_text(edited)  # the write ends
    assert watcher.poll().changed is False  # read once: the writer may not be done
    taken = watcher.poll()

    assert taken.policies is not None
    assert taken.policies is watcher.current
    assert taken.policies.limits.spec.floors == before.limits.spec.floors
    assert taken.policies.limits.spec.global_[LimitKind.CONCURRENT_REQUESTS] == 280


def test_a_change_read_again_after_a_return_to_the_set_in_force_settles_anew(
    policies: Path,
) -> None:
    watcher = PolicyWatcher(policies)
    before = watcher.load()
    (policies / "deep.yaml").write_text(DEEP)
    assert watcher.poll().changed is False
    (policies / "deep.yaml").unlink()
    assert watcher.poll().changed is False
    (policies / "deep.yaml").write_text(DEEP)

    assert watcher.poll().changed is False  # not two polls in a row
    rejected = watcher.poll()

    assert rejected.rejected
    assert rejected.reason == INVALID
    assert watcher.current is before


def test_a_file_removed_between_listing_and_reading_is_not_reported_as_a_broken_set(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = PolicyWatcher(policies)
    before = watcher.load()
    listed = policy_files(policies)
    gone = policies / "renamed-away.yaml"  # listed, then renamed by an editor's save

    monkeypatch.setattr("controller.control.reload.policy_files", lambda directory: [*listed, gone])
    assert watcher.poll().changed is False
    monkeypatch.undo()

    assert watcher.poll().changed is False  # the directory as it is: the set in force
    assert watcher.current is before
    _, [error] = check_files([gone], policies)
    assert "removed or renamed while the set was read" in error.message


def test_a_directory_rewritten_at_every_poll_is_never_taken_and_says_so(
    policies: Path,
) -> None:
    watcher = PolicyWatcher(policies)
    before = watcher.load()
    limits = policies / "limits.yaml"
    text = limits.read_text()
    outcomes = []
    for n in range(UNSETTLED_WARN_AFTER + UNSETTLED_REPEAT):  # a generator stamping each write
        limits.write_text(f"{text}\n# generated {n}\n")
        outcomes.append(watcher.poll())

    assert all(not o.changed for o in outcomes)
    assert watcher.current is before
    assert [o.unsettled for o in outcomes] == list(range(1, len(outcomes) + 1))
    warned = [o.unsettled for o in outcomes if unsettled_news(o.unsettled)]
    assert warned == [UNSETTLED_WARN_AFTER, UNSETTLED_WARN_AFTER + UNSETTLED_REPEAT]

    taken = watcher.poll()  # the writer stops: the next read agrees, the set is checked
    assert taken.changed
    assert taken.policies is watcher.current
    assert taken.unsettled == 0
