"""Governor: an adaptive throttling controller for AI inference APIs."""

__version__ = "0.1.0"
