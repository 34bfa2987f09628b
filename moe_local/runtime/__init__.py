"""Running a model: the loader that wires model and expert provider, sessions, generation, sampling,
chat templates, timing, the run report, and `inspect` / `eval`."""
