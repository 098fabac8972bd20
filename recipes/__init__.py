"""Multi-device training recipes: ``python -m recipes.train fit --config recipes/<recipe>.yaml``."""
