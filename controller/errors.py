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
