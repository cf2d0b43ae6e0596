"""The notifier: turns events into notifications and serves each user's feed."""
