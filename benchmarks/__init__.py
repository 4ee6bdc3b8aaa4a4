"""Ferry's benchmark harness: models, baselines, load from ghz, and the report (issue 5)."""
