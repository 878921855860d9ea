"""Kopf handlers and the reconciler that turns observed objects into config and status.

Importing this package registers the handlers with Kopf (see ``handlers``).
"""
