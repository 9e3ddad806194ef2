"""Loaded by Python at start-up when this folder is on PYTHONPATH: lets open_clip_train 3.3 read
any WebDataset with webdataset 1.0.

webdataset >= 0.2.96 ends each shard with an empty `{}` record (`eof_value`), and
open_clip_train's `group_by_keys_nothrow` fails on it with `KeyError: 'fname'`, whatever the
shards hold (webdataset/webdataset#384, mlfoundations/open_clip#935). The fix named there is
`eof_value=None`; this makes it the default, so `python -m open_clip_train.main` runs unchanged.
"""

from webdataset import tariterators

handler, select_files, rename_files, _ = tariterators.tar_file_expander.__defaults__
tariterators.tar_file_expander.__defaults__ = (handler, select_files, rename_files, None)
