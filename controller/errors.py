"""Governor's own exception hierarchy; client errors are wrapped into these (`raise … from`)."""


class GovernorError(Exception):
    """Base of every error Governor raises on purpose."""


class ConfigurationError(GovernorError):
    """Settings or start-up configuration that cannot work; the message names the fix."""


class PolicyError(GovernorError):
    """A policy file or directory that cannot be loaded."""


class SignalError(GovernorError):
    """A Prometheus query failed; names the query and the policy that uses it."""


class SinkError(GovernorError):
    """A sink (Redis, Kong, Kubernetes) could not be read or written."""

    hinted = False  # its message already says what to do about the server's reply


def untrusted_certificate_hint(group: str, server: str) -> str:
    """What to set when a TLS server's certificate did not verify: `group` is the settings
    group (`REDIS`, `KONG`, `PROMETHEUS`), `server` names whose certificate it was."""
    return (
        f"set GOVERNOR_{group}__CA_FILE to the CA bundle that signed {server} certificate; "
        f"GOVERNOR_{group}__VERIFY_TLS=false only to test"
    )
