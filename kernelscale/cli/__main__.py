import sys

from kernelscale.cli import main

sys.exit(main())
