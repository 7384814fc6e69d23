"""A closed tab's page is freed: nothing the app or its libraries keep holds on to it.

NiceGUI's upload element registers a route per page, and FastAPI keeps every route endpoint it has
seen in its caches: through the element that kept each closed tab's page alive (about 0.7 MB a
tab). `ui.upload.PageUpload` empties the endpoint's closure when the page is deleted.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

from nicegui import Client, background_tasks

from tests.ui.conftest import Simulated
from tests.ui.test_page import eventually
from ui.canvas import DigitCanvas
from ui.upload import release


async def test_a_deleted_page_is_freed(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = next(iter(sim.user.find(DigitCanvas).elements))
    page = weakref.ref(canvas)
    client = canvas.client
    assert client.id in Client.instances
    # the page's own work on connecting (it holds the page while it runs) is over
    await eventually(lambda: not any("connected" in t.get_name() for t in background_tasks.running_tasks))
    client.delete()
    sim.user.client = None  # the simulated browser keeps its last page's client; a real one has none
    client_id = client.id
    del canvas, client
    # what the client ran ends by itself soon after (its outbox's loop)
    await eventually(lambda: not any(client_id in t.get_name() for t in background_tasks.running_tasks))
    gc.collect()
    assert page() is None, [type(r).__qualname__ for r in gc.get_referrers(page())]


def test_release_empties_only_the_cells_holding_the_object() -> None:
    held, other = object(), object()

    def make() -> Callable[[], tuple[object, object]]:
        def inner() -> tuple[object, object]:
            return held_here, other_here

        held_here, other_here = held, other
        return inner

    inner = make()
    assert release(inner, held) == 1
    assert inner() == (None, other)
    assert release(inner, held) == 0
    assert release(len, held) == 0  # no closure at all
