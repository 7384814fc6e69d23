"""Container health: healthy only when the `mnist` model has a READY worker (not just /ping)."""

import json
import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:8081/models/mnist", timeout=4) as response:
        workers = json.load(response)[0]["workers"]
except (OSError, ValueError, KeyError, IndexError):
    sys.exit(1)
sys.exit(0 if any(worker.get("status") == "READY" for worker in workers) else 1)
