"""`python -m pangu_infer ...`: the same as the `pangu-infer` command."""

import sys

from pangu_infer.cli import main

sys.exit(main())
