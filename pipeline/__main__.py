"""`python -m pipeline ...` is the `procl` command line."""

import sys

from pipeline.cli import main

sys.exit(main())
