"""Data shipped inside the package (read with importlib.resources, so a wheel has it too)."""
