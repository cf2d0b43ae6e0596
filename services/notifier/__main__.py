"""``python -m services.notifier``: run the notifier until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

from aiohttp import web

from services.notifier.app import create_app
from shared.logging import configure_logging
from shared.settings import SettingsError, load_settings


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"interlude notifier: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging("notifier", settings.log_format)
    web.run_app(create_app(settings), host=settings.host, port=settings.notifier_port,
                print=None)


if __name__ == "__main__":
    main()
