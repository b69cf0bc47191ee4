"""``python -m engine`` runs the talkscope CLI."""

import sys

from engine.cli import main

sys.exit(main())
