"""`python -m autonomic`: the same command line as the `autonomic` console script."""

import sys

from autonomic.compiler.cli import main

sys.exit(main())
