"""Signals: PromQL queries run once per tick, answered as a snapshot with honest validity."""

from controller.signals.prometheus import PrometheusSource, error_sample, signal_errors

__all__ = ["PrometheusSource", "error_sample", "signal_errors"]
