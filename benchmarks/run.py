"""Run the side-by-side benchmark: the same as ``fdp bench`` (arguments pass through).

    python benchmarks/run.py --quick --out /tmp/quick.json
    python benchmarks/run.py --component mlp --K 4 --batch 1,256     # on a GPU: results in ./fdp-bench/
"""

import sys

from fdp.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
