import sys

from imageapi.rbdfuse.server import main

sys.exit(main(sys.argv[1:]))
