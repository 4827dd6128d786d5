"""``python -m st_predict`` = the ``st-predict`` command (see :mod:`st_predict.cli._main`)."""

from __future__ import annotations

import sys

from st_predict.cli import main

if __name__ == "__main__":
    sys.exit(main())
