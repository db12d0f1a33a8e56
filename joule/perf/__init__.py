"""Performance and energy model, serving simulator and hardware planner (see docs/perf-model.md)."""
