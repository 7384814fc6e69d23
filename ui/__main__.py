"""`python -m ui`: serve the page and the API (the UI image's command); `make run` is `python -m stack`.

Serves only: `DATABASE_URL` must name a migrated database (`python -m db migrate`), TorchServe is
expected at `INFERENCE_URL`. Stops on Ctrl-C or SIGTERM with status 0; 1 when it cannot start,
2 when `DATABASE_URL` is unset.
"""

from __future__ import annotations

import argparse
import sys

from settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ui", description="Serve the digit classifier's page and API."
    )
    parser.add_argument("--host", help="address (default: UI_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: UI_PORT, 8500)")
    args = parser.parse_args(argv)

    settings = get_settings()
    updates = {k: v for k, v in (("ui_host", args.host), ("ui_port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    if not settings.database_url:
        print(
            "python -m ui: DATABASE_URL is not set. Set it to a migrated PostgreSQL database "
            "(python -m db migrate), or run the whole stack with `make run`.",
            file=sys.stderr,
        )
        return 2

    from .app import serve

    url = f"http://{settings.ui_host}:{settings.ui_port}"
    try:
        serve(settings, on_started=lambda: print(f"Digit classifier: {url}  (API: {url}/docs)", flush=True))
    except RuntimeError as exc:
        print(f"python -m ui: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
