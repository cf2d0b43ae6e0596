"""``python -m services.notifier``: run the notifier until SIGTERM or SIGINT."""

from services.runner import run_service

if __name__ == "__main__":
    run_service("notifier")
