"""`python -m pipeline.cli ...` runs the same CLI as the `precision-search` script."""

import sys

from pipeline.cli import main

sys.exit(main())
