"""``python -m costwarden.gateway``: the gateway without the main CLI."""

import sys

from costwarden.gateway.cli import main

sys.exit(main())
