"""`python -m bgesmall.server [options]`: the same as `bgesmall serve`."""

import argparse
import sys

from . import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bgesmall.server", description=__doc__)
    sys.exit(run(add_arguments(parser).parse_args()))
