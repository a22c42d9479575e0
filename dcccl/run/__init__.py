"""Running the method: stage artifacts, the run directory and its manifest, the plan (settings to stage calls), the
coordinator that executes a plan through a stage runner, the privacy boundary, metrics."""
