"""One KFP component per pipeline step: thin, typed functions that call clipflow.

Each is a lightweight Python component: KFP ships the function's source and runs it in the
clipflow image (locally, in this environment through `kfp.local`). Heavy imports stay inside
the function bodies, and every component returns a JSON `report` of its step, which the
pipeline exposes as an output.
"""

import os

# The container image every step runs in on a cluster; kfp.local ignores it.
CLIPFLOW_IMAGE = os.environ.get("CLIPFLOW_IMAGE", "clipflow:latest")
