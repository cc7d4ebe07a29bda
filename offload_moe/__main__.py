"""`python -m offload_moe fit PATH ...`: the plan `load` would make, printed before anything is loaded."""

import sys

from offload_moe.fit_plan import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["fit"]:
        sys.exit("usage: python -m offload_moe fit PATH [--budget auto] [--device cpu] [--ram-budget SIZE] ...")
    main(sys.argv[2:])
