"""`python -m gg_notebook ...` is the same as `gg-notebook ...`."""

import sys

from gg_notebook.cli import main

sys.exit(main())
