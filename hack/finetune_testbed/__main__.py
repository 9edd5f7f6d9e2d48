"""``python3 -m finetune_testbed`` (with hack/ on the path) is ``hack/cluster``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
