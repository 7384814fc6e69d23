"""The web page, the JSON API and `python -m ui` (serve only; `make run` is `python -m stack`)."""
