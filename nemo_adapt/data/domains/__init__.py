"""Generated domain datasets (deterministic, seeded) used by recipes and tests."""
