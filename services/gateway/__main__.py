"""``python -m services.gateway``: run the gateway."""

from services.runner import run_service

if __name__ == "__main__":
    run_service("gateway")
