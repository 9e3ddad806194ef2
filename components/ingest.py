from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def ingest_component(
    params: str,
    overrides: list,
    profile: str,
    source: str,
    data: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("data_version", str), ("report", str)]):
    """Write WebDataset shards, metadata and sizes.json from a source.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        source: `builtin`, or a manifest or shard location.
        data: the data directory this step fills.
    """
    from collections import namedtuple

    from clipflow.artifacts import dvc_md5
    from clipflow.data.ingest import ingest
    from clipflow.params import parse_params

    resolved = parse_params(params, overrides, profile or None)
    report = ingest(source, data.path, resolved.data, resolved.validate, resolved.tracking)
    data.metadata.update({"data_version": report.data_version, "rows": report.kept})
    # What `dvc add` or dvc.lock would record for this folder, and the code that wrote it.
    data.metadata.update({"dvc_md5": dvc_md5(data.path), "git_revision": report.git_revision or ""})
    return namedtuple("IngestOutputs", ["data_version", "report"])(report.data_version, report.to_json())


if __name__ == "__main__":
    compile_main(ingest_component)
