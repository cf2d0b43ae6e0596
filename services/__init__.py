"""Interlude's three services (gateway, messaging, notifier) and the operator CLI."""
