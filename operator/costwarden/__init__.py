"""costwarden: AI budgets as Kubernetes resources."""

__version__ = "0.1.0"
