"""``python -m desim``: the same as the ``desim`` command."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
