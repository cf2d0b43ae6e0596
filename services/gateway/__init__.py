"""Gateway: the one public entry. Accounts, credentials, sessions, routing."""
