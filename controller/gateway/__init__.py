"""The enforcement data plane: admission scripts, budgets, credits and the reference gateway."""
