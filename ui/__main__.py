"""`python -m ui`: run the whole app (see `ui.launcher`)."""

import sys

from ui.launcher import main

sys.exit(main())
