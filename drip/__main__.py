"""``python3 -m drip``: the drip command without installing its console script."""

import sys

from .cli import main

sys.exit(main())
