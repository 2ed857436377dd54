"""The closed-loop simulator: a simulated GPU fleet, tenants and gateway driving the real loop."""
