"""The web page, the JSON API and `python -m ui` (the launcher behind `make run`)."""
