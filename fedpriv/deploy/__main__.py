"""``python -m fedpriv.deploy``: the command line of :mod:`fedpriv.deploy.cli`."""

import sys

from fedpriv.deploy.cli import main

sys.exit(main())
