"""`python -m vsearch_cli`: the same as the `vsearch` console script."""

import sys

from vsearch_cli.main import main

sys.exit(main())
