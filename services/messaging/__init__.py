"""Messaging: relationships, invites, device keys, check-ins, replies and the outbox."""
