"""MLflow: the outage-proof logger and its delivery, spill records and replay, the run configuration,
artifacts, plots and the compare command."""
