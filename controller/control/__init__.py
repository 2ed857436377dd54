"""The control plane: the tick, its reconciler, and the daemon around it (scheduler, leader
election, policy reload, overrides, telemetry), composed in one place."""
