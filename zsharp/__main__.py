"""``python -m zsharp ARGS`` is the ``zsharp`` command line (``torchrun -m zsharp train …``)."""

import sys

from zsharp.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
