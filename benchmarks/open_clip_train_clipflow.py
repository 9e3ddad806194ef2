"""`python -m open_clip_train.main` that also knows clipflow's model configs (CLIP-Tiny).

open_clip_train resolves `--model` among open_clip's registered configs; this registers
clipflow's first and then hands every argument to open_clip_train unchanged.

One compatibility shim: webdataset 1.0 (pinned by clipflow) yields an empty dict at the end of
each shard (`tar_file_expander(eof_value={})`), which open_clip_train 3.3's
`group_by_keys_nothrow` does not expect (KeyError 'fname' at the first shard boundary). The
shim asks webdataset for the pre-1.0 behaviour; the shards themselves are read unchanged.
"""

import functools
import sys

import open_clip_train.data
from open_clip_train.main import main
from webdataset.tariterators import tar_file_expander

from clipflow.model import register_configs

if __name__ == "__main__":
    open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    register_configs()
    main(sys.argv[1:])
