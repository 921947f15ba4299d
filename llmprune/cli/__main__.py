"""``python -m llmprune.cli``: the same as the ``llmprune`` command."""

import sys

from llmprune.cli.commands import main

sys.exit(main())
