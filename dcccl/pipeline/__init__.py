"""The plan of a run and its execution: settings, stages, steps, the coordinator, the checks before running, the privacy
boundary, fusion and metrics. Plain PyTorch: it does not import Lightning."""
