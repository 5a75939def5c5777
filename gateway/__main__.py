"""``python -m gateway`` is the ``portcullis`` command (how the supervisor starts its workers)."""

import sys

from gateway.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
