"""Load benchmarks (`tidings bench ...`)."""
