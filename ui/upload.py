"""`PageUpload`: NiceGUI's file upload element, letting go of its page when the page is deleted.

NiceGUI registers one route per upload element, an endpoint whose closure holds the element; it
removes the route when the element goes, but FastAPI keeps every endpoint it has seen in its
callable caches (up to 4,096 entries each). Through the element's handlers that kept each closed
tab's whole page alive: about 0.7 MB a tab, up to some 3 GB once the caches fill (measured with
`python bench/soak.py`, the UI's resident memory after the tabs closed). Emptying the closure when
the element is deleted leaves the caches a small function each.
"""

from __future__ import annotations

from nicegui import app, ui


class PageUpload(ui.upload):
    """`ui.upload` whose route endpoint forgets the element once it is deleted."""

    def _handle_delete(self) -> None:
        endpoints = [
            endpoint
            for route in app.routes
            if getattr(route, "path", None) == self._registered_url
            and (endpoint := getattr(route, "endpoint", None)) is not None
        ]
        super()._handle_delete()
        for endpoint in endpoints:
            release(endpoint, self)
        self._begin_upload_handlers.clear()
        self._upload_handlers.clear()
        self._multi_upload_handlers.clear()


def release(function: object, held: object) -> int:
    """Empty the cells of `function`'s closure that hold `held`; how many were emptied."""
    emptied = 0
    for cell in getattr(function, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if contents is held:
            cell.cell_contents = None
            emptied += 1
    return emptied
