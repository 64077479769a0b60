"""``python -m infoscale_triton``: the command line, which lives in :mod:`infoscale_triton.cli`."""

import sys

from infoscale_triton.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
