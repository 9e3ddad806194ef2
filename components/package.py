from kfp import dsl
from kfp.dsl import Dataset, Input

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def package_component(
    params: str, overrides: list, profile: str, model_name: str, data: Input[Dataset], index_source: str = ""
) -> str:
    """Build a Bento that serves the registry's `champion` of `model_name`, with a search gallery.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        model_name: the registered model whose champion is served.
        data: the ingested data directory; its `serve.gallery_split` images become the gallery.
        index_source: the catalogue the run indexes next, or "": given one, `search` answers from the
            vector store (`index.uri`, `index.alias`) that the index step fills.

    Returns:
        The step's JSON report, with the Bento tag.
    """
    import json
    from pathlib import Path

    from clipflow.params import parse_params
    from clipflow.serve.package import package
    from components import checkout

    resolved = parse_params(params, overrides, profile or None)
    serving = checkout() / "serving"  # the step runs in the checkout (kfp.local) or the image's copy of it
    # The BentoML store is the process's: `clipflow run` and the step image (deploy/Dockerfile) set BENTOML_HOME.
    store = resolved.index if index_source else None
    result = package(f"models:/{model_name}@champion", resolved, serving, gallery=Path(data.path), index=store)
    return json.dumps(result.to_dict())


if __name__ == "__main__":
    compile_main(package_component)
