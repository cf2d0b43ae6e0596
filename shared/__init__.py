"""Code used by more than one Interlude service: settings, logging, database,
migrations, internal authentication, event schemas and AMQP plumbing."""
