"""Jobs over several stages: the whole pipeline from one TOML file, and a run's report."""
