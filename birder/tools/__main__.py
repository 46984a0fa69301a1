"""``python -m birder.tools <command>``: list, download, inspect and convert models."""

import sys

from birder.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
