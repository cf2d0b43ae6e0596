"""``python -m services.messaging``: run the messaging service."""

from services.runner import run_service

if __name__ == "__main__":
    run_service("messaging")
