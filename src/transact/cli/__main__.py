"""``python -m transact.cli`` (how torchrun and accelerate launch start ``transact run`` on several processes)."""

import sys

from transact.cli import main

sys.exit(main())
