"""The demo (``make demo``) and the generator of the example MLflow store (``make example``)."""
