"""`python -m open_clip_train.main` that also knows clipflow's model configs (CLIP-Tiny).

open_clip_train resolves `--model` among open_clip's registered configs; this registers
clipflow's first and then hands every argument to open_clip_train unchanged.
"""

import sys

from open_clip_train.main import main

from clipflow.model import register_configs

if __name__ == "__main__":
    register_configs()
    main(sys.argv[1:])
