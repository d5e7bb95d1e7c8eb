"""`python -m imageapi`: the same as `imageapi-server`."""

import sys

from imageapi.cli import main

sys.exit(main())
