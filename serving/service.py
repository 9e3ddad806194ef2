"""The clipflow BentoML service: embeddings, zero-shot classification, ranking and gallery search.

`clipflow package` builds this file into a Bento together with the clipflow package and passes the
exact model tag, host, port and request body limit as Bento arguments, so `bentoml serve
<bento_tag>` needs nothing else. The other request limits, the evaluation templates, the precision
and the gallery index live in the BentoML model, written by `clipflow package` from params.yaml, so a
Bento keeps what it was built with.

What clients see of it, with an example call of each endpoint, is `API_DESCRIPTION` below, which
the API docs at /docs show above every endpoint's docstring; a browser at http://127.0.0.1:3000/
gets a page (`page.html`) that searches the gallery by text or image and classifies an uploaded
image.

This file maps HTTP onto `clipflow.serve` and nothing more: the checks and their limits are in
`clipflow.serve.inputs`, the classify and rank arithmetic in `clipflow.serve.encoder`, the error
answers and the docs in `clipflow.serve.http`, and every change to BentoML itself in
`clipflow.serve.bentoml_patches`.

The model runs on the CPU cores in lanes, one thread per core with one torch thread each
(`clipflow.serve.encoder`), at the precision `serve.precision` packaged: bf16 weights and inputs
where `auto` finds the CPU's native bf16 arithmetic (`clipflow.model.precision`), else fp32.
`encode_text`, `encode_image` and `encode_image_base64` batch adaptively (`serve.batching`):
concurrent requests are merged into model calls of at most `serve.batch_max_size` items, each
call on one lane, one call per lane at a time, and each
client still sends a list and gets its own list back. Once a lane is free, its batch waits while
requests keep arriving, so clients that ask again as soon as they are answered fill the next
batch; what is queued when requests stop arriving is spread over the free lanes
(`clipflow.serve.dispatch`). The other endpoints split each model call across the lanes.
Batched inputs are checked and decoded while the request is parsed, in a worker thread, so a bad
input fails its own request only, never a batch it would have joined; a request that would wait
more than `serve.batch_max_latency_ms` behind those queued answers 503 with `Retry-After` when it
arrives. The other model endpoints run one call per core; past those and `serve.max_waiting`
waiting ones, a request answers 503 with `Retry-After` before its body is read. Images are
decoded to near the model's input size (`clipflow.images`, as ingest decodes them), within
`serve.max_request_pixels` for all the images of one request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, Union

import bentoml
import PIL.Image
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable
from pydantic import AfterValidator, BaseModel

from clipflow import vectors
from clipflow.index import store
from clipflow.model import image_side
from clipflow.params import IndexParams
from clipflow.serve import bentoml_patches, encoder, openai_api
from clipflow.serve.dispatch import SHED, FillingDispatcher, Overloaded
from clipflow.serve.encoder import usable_cores
from clipflow.serve.http import (
    OPEN_PATHS,
    AdmissionMiddleware,
    ApiDocs,
    ApiKeyMiddleware,
    PageMiddleware,
    RequestGateMiddleware,
    ShedMiddleware,
    StrictJSONSerde,
    StrictMultipartSerde,
)
from clipflow.serve.inputs import (
    Limits,
    check_image_count,
    check_item_id,
    check_k,
    check_labels,
    check_page,
    check_query_text,
    check_text_list,
    decode_base64_images,
    guard_decoder,
    open_image,
    open_images,
)

if TYPE_CHECKING:
    import torch

    from clipflow.serve.gallery import Gallery


class BuildArgs(BaseModel):
    """Set by `clipflow package` (`bentoml build --arg`) and stored in the Bento.

    The body limit is here rather than with the other limits because the HTTP layer applies it
    before the service (and its model) is loaded.
    """

    model_tag: str
    host: str
    port: int
    max_request_bytes: int
    batching: bool
    batch_max_size: int
    batch_max_latency_ms: int
    max_waiting: int
    tracing: bool


class LabelProbability(BaseModel):
    """A label's share of the image among the labels of one call, and its cosine with the image."""

    label: str
    probability: float
    cosine: float


class Match(BaseModel):
    """A ranked candidate: its position in the request's candidate list and its scores."""

    index: int
    cosine: float
    probability: float


class GalleryItem(BaseModel):
    id: str
    caption: str
    score: float
    image_path: Optional[str] = None  # where the catalogue keeps the image (items of an index)
    metadata: dict[str, Any] = {}  # the item's other metadata fields (items of an index)


# A search filter: metadata field -> the value it must equal, or a list of values it must be one of.
FilterValue = Union[str, int, float, bool]
SearchFilter = Optional[dict[str, Union[FilterValue, list[FilterValue]]]]


class ModelInfo(BaseModel):
    """The served model, where it came from, and the gallery `search` ranks."""

    name: str  # its name in the MLflow registry, or the BentoML model's when it was not registered
    version: Optional[str]  # its version in the registry
    alias: Optional[str]  # the registry alias it was packaged from (`champion`)
    uri: str  # the model reference `clipflow package` was given
    bento_model: str  # the BentoML model's tag
    architecture: str  # its open_clip config
    precision: str  # what it runs at on this server
    gallery_size: int  # 0 without a gallery
    gallery_split: Optional[str]
    index_alias: Optional[str] = None  # the vector store alias `search` reads, when packaged with an index
    index_collection: Optional[str] = None  # the collection it names now (None: not published, or the store is down)


API_DESCRIPTION = """\
Embeddings, zero-shot classification, ranking and gallery search with the CLIP model this Bento
serves (`model_info` names it). A browser at [/](/) gets a page that calls these endpoints.

Every embedding is L2-normalised, so a dot product is a cosine. Labels are words ("red circle");
`classify` turns each into a prompt ensemble (by default the evaluation's templates), so served
probabilities behave like the evaluated zero-shot accuracy. Probabilities are shared among the
labels of one call and add up to 1: compare cosines to judge how well a label fits on its own.

```sh
curl -s -X POST http://127.0.0.1:3000/encode_text -H 'content-type: application/json' \\
     -d '{"texts": ["a red circle"]}'
curl -s -X POST http://127.0.0.1:3000/encode_image -F images=@a.png -F images=@b.png
curl -s -X POST http://127.0.0.1:3000/classify -F image=@shape.png \\
     -F 'labels=["red circle", "blue square"]' -F 'templates=["a drawing of a {}."]'
curl -s -X POST http://127.0.0.1:3000/rank -F 'queries=["a red circle"]' \\
     -F candidates=@a.png -F candidates=@b.png
curl -s -X POST http://127.0.0.1:3000/search -H 'content-type: application/json' \\
     -d '{"text": "a red circle", "k": 5}'
curl -s -X POST http://127.0.0.1:3000/search -H 'content-type: application/json' \\
     -d '{"text": "a red circle", "k": 5, "offset": 5, "filter": {"colour": ["red", "blue"]}}'
curl -s -X POST http://127.0.0.1:3000/search_image -F image=@shape.png -F k=5
curl -s -X POST http://127.0.0.1:3000/gallery_image -H 'content-type: application/json' \\
     -d '{"id": "test-0000007"}' -o item.png
curl -s -X POST http://127.0.0.1:3000/model_info -H 'content-type: application/json' -d '{}'
```

OpenAI's embeddings API is served too, at `/v1/embeddings` (texts, or images with
`extra_body={"modality": "image"}`) and `/v1/models`, with OpenAI's error shape:

```python
client = openai.OpenAI(base_url="http://127.0.0.1:3000/v1", api_key=os.environ.get("CLIPFLOW_API_KEY", "-"))
vectors = client.embeddings.create(model="clipflow-clip", input=["a red circle"])
```

When the server's environment sets `CLIPFLOW_API_KEY`, every endpoint but the probes, `/metrics`
and these docs needs that key: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Every refusal answers `{"error": "<message>"}` with its status (the `Error` schema); each
endpoint lists the statuses it may answer.
"""


# Where the deployed service finds the vector store when it is not where `clipflow package` saw it
# (a Milvus Service in the cluster instead of a local folder).
INDEX_URI_ENV = "CLIPFLOW_INDEX_URI"
STORE_RETRY_AFTER_S = 5

ARGS = bentoml.use_arguments(BuildArgs)
BENTO_MODEL = bentoml.models.BentoModel(ARGS.model_tag)
PAGE = Path(__file__).with_name("page.html")
# BentoML shows its own loggers' lines in the server's log.
logger = logging.getLogger("bentoml.serve.clipflow")
BATCHED = {
    "batchable": ARGS.batching,
    "max_batch_size": ARGS.batch_max_size,
    "max_latency_ms": ARGS.batch_max_latency_ms,
}
API_DOCS = ApiDocs(
    title="clipflow API",
    description=API_DESCRIPTION,
    examples={
        "/encode_text": {"texts": ["a red circle", "two blue squares"]},
        "/encode_image_base64": {"images": ["data:image/png;base64,iVBORw0KGgo..."]},
        "/classify": {"labels": ["red circle", "blue square", "green star"], "templates": ["a drawing of a {}."]},
        "/rank": {"queries": ["a red circle"]},
        "/rank_texts": {"candidates": ["a red circle", "a blue square"]},
        "/search": {"text": "a red circle", "k": 5, "filter": {}, "offset": 0},
        "/search_image": {"k": 5, "offset": 0},
        "/gallery_image": {"id": "test-0000007"},
    },
    gallery_paths=frozenset({"/search", "/search_image", "/gallery_image"}),
)
# BentoML's own dispatcher runs one call at a time and splits closed-loop clients into a batch of
# one and a batch of the rest; its own parsers answer some malformed requests with 500 and
# validate on the event loop; its metrics add series for every path a client makes up; its API
# docs describe it, not this service.
bentoml_patches.install(
    functools.partial(FillingDispatcher, lanes=usable_cores()),
    serdes=(StrictJSONSerde, StrictMultipartSerde),
    labelled_paths=OPEN_PATHS | openai_api.PATHS,
    openapi=API_DOCS.rewrite,
)


@functools.cache
def limits() -> Limits:
    """The request limits packaged with the model; read once per worker."""
    return Limits(**BENTO_MODEL.resolve().info.metadata["limits"])


@functools.cache
def served_model() -> openai_api.ServedModel:
    """The model as `/v1/models` lists it and `/v1/embeddings` names it; read once per worker."""
    return openai_api.served_model(BENTO_MODEL.resolve())


@functools.cache
def decode_side() -> int:
    """The shorter side the model's preprocess resizes images to: uploads are decoded to near it."""
    return image_side(BENTO_MODEL.resolve().info.metadata["model_config"])


# Validators of the batched endpoints' single argument: they run per request, while BentoML
# parses it, before the request joins a batch. They return the value the endpoint receives.


def _checked_texts(texts: list[str]) -> list[str]:
    return check_text_list("texts", texts, limits())


def _decoded_files(paths: list[Path]) -> list[PIL.Image.Image]:
    return open_images("images", paths, limits(), decode_side())


def _decoded_base64(texts: list[str]) -> list[PIL.Image.Image]:
    return decode_base64_images("images", texts, limits(), decode_side())


# Clients (and the API schema) see text lists and file uploads; the endpoints get checked texts
# and decoded images.
Texts = Annotated[list[str], AfterValidator(_checked_texts)]
ImageFiles = Annotated[list[Path], AfterValidator(_decoded_files)]
Base64Images = Annotated[list[str], AfterValidator(_decoded_base64)]


# BentoML's OpenTelemetry middleware makes a span for every request whether or not one is sampled;
# a URL it excludes it passes straight through.
UNTRACED = {} if ARGS.tracing else {"tracing": {"excluded_urls": ".*"}}


# BentoML runs at most `threads` calls at once: one per lane (core) lets the dispatcher run a batch
# in every lane, and keeps every core busy when calls are not batched.
@bentoml.service(name="clipflow", http={"host": ARGS.host, "port": ARGS.port}, threads=usable_cores(), **UNTRACED)
class Clipflow:
    bento_model = BENTO_MODEL

    def __init__(self) -> None:
        # Imported here: `bentoml serve` and `bentoml build` import this module only to read the
        # service's config, and torch would add seconds to both.
        from clipflow import model as clip_model
        from clipflow.model.precision import resolve_precision
        from clipflow.serve import gallery

        metadata = self.bento_model.info.metadata
        # `auto` is decided here, on the hardware that serves; `clipflow package` checked bf16 against fp32.
        precision = resolve_precision(metadata["precision"])
        clip = clip_model.load(self.bento_model.path_of(clip_model.CHECKPOINT_FILE)).at_precision(precision)
        self.encoder = encoder.Encoder.per_core(clip)
        logger.info("serving %s at %s (serve.precision %s)", self.bento_model.tag, precision, metadata["precision"])
        self.limits = limits()
        self.templates = metadata["templates"]
        self.gallery = gallery.load(Path(self.bento_model.path))
        self.searcher = _searcher(metadata.get("index"))
        guard_decoder(self.limits)
        uri = metadata["model_uri"]
        self.info = ModelInfo(
            name=metadata.get("mlflow_model", self.bento_model.tag.name),
            version=metadata.get("mlflow_version"),
            # `clipflow package` pins an alias to its version, and keeps the reference it was given.
            alias=(uri.partition("@")[2] or None) if uri.startswith("models:/") else None,
            uri=uri,
            bento_model=str(self.bento_model.tag),
            architecture=metadata["model_config"],
            precision=precision,
            gallery_size=len(self.gallery) if self.gallery is not None else 0,
            gallery_split=metadata.get("gallery", {}).get("split"),
        )

    @bentoml.api
    def model_info(self) -> ModelInfo:
        """The served model (registry name, version and the alias it was packaged from), the gallery size, and
        the index `search` reads (its alias and the collection that alias names now)."""
        if self.searcher is None:
            return self.info
        try:
            index = self.searcher.searcher.describe()
        except vectors.StoreUnavailable as exc:
            logger.warning("model_info: %s", exc)
            index = {"alias": self.searcher.params.alias, "collection": None}
        return self.info.model_copy(update={"index_alias": index["alias"], "index_collection": index["collection"]})

    @bentoml.api(**BATCHED)
    def encode_text(self, texts: Texts) -> list[list[float]]:
        """L2-normalised embeddings of `texts`, one row per text."""
        return self.encoder.texts(texts, one_lane=ARGS.batching).tolist()

    @bentoml.api(**BATCHED)
    def encode_image(self, images: ImageFiles) -> list[list[float]]:
        """L2-normalised embeddings of uploaded images (multipart files), one row per image."""
        return self.encoder.images(images, one_lane=ARGS.batching).tolist()

    @bentoml.api(**BATCHED)
    def encode_image_base64(self, images: Base64Images) -> list[list[float]]:
        """`encode_image` for JSON clients: images as base64 strings (or `data:` URLs)."""
        return self.encoder.images(images, one_lane=ARGS.batching).tolist()

    @bentoml.api
    def classify(self, image: Path, labels: list[str], templates: Optional[list[str]] = None) -> list[LabelProbability]:
        """Zero-shot classify an image: every label with its probability and cosine, most likely first.

        `cosine` is the cosine similarity between the image and the label's prompt ensemble,
        built from `templates` (each holds `{}` where the label goes; default: the evaluation's
        templates). `probability` is the softmax over the labels of the model's logit scale times
        the cosine: relative to the labels of this call, so one label of one gets 1.
        """
        check_labels(labels, templates, self.limits)
        image_features = self.encoder.images([open_image(image, self.limits, decode_side())])
        label_features = self.encoder.labels(labels, templates or self.templates)
        scores = encoder.classify(image_features, label_features, labels, self.encoder.logit_scale)
        return [LabelProbability(label=s.label, probability=s.probability, cosine=s.cosine) for s in scores]

    @bentoml.api
    def rank(self, queries: list[str], candidates: list[Path]) -> list[list[Match]]:
        """Rank candidate images for each text query.

        Returns one list per query, in query order; each holds every candidate (by its index in
        `candidates`) with its cosine and its probability, the softmax over candidates of the
        model's logit scale times the cosine, most probable first.
        """
        check_text_list("queries", queries, self.limits)
        decoded = open_images("candidates", candidates, self.limits, decode_side())
        return self._rank(self.encoder.texts(queries), self.encoder.images(decoded))

    @bentoml.api
    def rank_texts(self, queries: list[Path], candidates: list[str]) -> list[list[Match]]:
        """Rank candidate texts for each query image: `rank` the other way round."""
        check_image_count("queries", queries, self.limits)
        check_text_list("candidates", candidates, self.limits)
        decoded = open_images("queries", queries, self.limits, decode_side())
        return self._rank(self.encoder.images(decoded), self.encoder.texts(candidates))

    # The searches are async: the vector store's calls carry every query waiting meanwhile
    # (`store.QueryBatcher`), which needs more waiting queries than BentoML has threads.
    @bentoml.api
    async def search(self, text: str, k: int = 5, filter: SearchFilter = None, offset: int = 0) -> list[GalleryItem]:
        """The `k` items whose images best match `text`, best first, after skipping the `offset` best.

        `score` is the cosine similarity between the query and the item's image embedding. A Bento
        packaged with an index searches its vector store (`model_info` names the collection), where
        `filter` keeps only the items whose metadata fields equal the value given (or one of a list of
        values); otherwise it searches its gallery, which has no metadata to filter. `k + offset` is at
        most `serve.max_k`.
        """
        self._check_search(k, filter, offset)
        check_query_text("text", text, self.limits)
        query = await asyncio.to_thread(self.encoder.texts, [text])
        return await self._search(query[0], k, filter, offset)

    # Its own endpoint rather than an optional `image` of `search`: BentoML 1.4 cannot take an
    # optional file (Optional[Path] fails at import, `Path | None` refuses every upload).
    @bentoml.api
    async def search_image(
        self, image: Path, k: int = 5, filter: SearchFilter = None, offset: int = 0
    ) -> list[GalleryItem]:
        """`search` with an uploaded image as the query."""
        self._check_search(k, filter, offset)
        query = await asyncio.to_thread(self._image_query, image)
        return await self._search(query, k, filter, offset)

    @bentoml.api
    def gallery_image(self, id: str) -> PIL.Image.Image:
        """The PNG thumbnail of the gallery item `id` (as `search` returns it)."""
        gallery = self._gallery()
        check_item_id(id, self.limits)
        thumbnail = gallery.thumbnail(id)
        if thumbnail is None:
            raise NotFound(f"the gallery has no item {id[:80]!r}")
        return PIL.Image.open(io.BytesIO(thumbnail))

    def _check_search(self, k: int, filter: SearchFilter, offset: int) -> None:
        check_page(k, offset, self.limits)
        if self.searcher is None:
            self._gallery(k)
            if filter:
                raise InvalidArgument(
                    "filter: this Bento searches its gallery, which has no metadata: package it with an index"
                )
        else:
            try:
                vectors.filter_expression(filter)
            except vectors.FilterError as exc:
                raise InvalidArgument(str(exc)) from None

    def _image_query(self, image: Path) -> torch.Tensor:
        return self.encoder.images([open_image(image, self.limits, decode_side())])[0]

    async def _search(self, query: torch.Tensor, k: int, filter: SearchFilter, offset: int) -> list[GalleryItem]:
        if self.searcher is None:
            found = await asyncio.to_thread(self._gallery(k).search, query, k + offset)
            return [GalleryItem(**item) for item in found[offset:]]
        try:
            found = await self.searcher.search(query.float().numpy(), k, filter, offset)
        except vectors.NotPublished as exc:
            raise NotFound(str(exc)) from None
        except vectors.StoreUnavailable as exc:
            logger.warning("search: %s", exc)
            raise _refused(StoreDown(str(exc))) from None
        return [
            GalleryItem(
                id=item.pop("id"),
                caption=item.pop("caption", ""),
                score=item.pop("score"),
                image_path=item.pop("image_path", None),
                metadata=item,
            )
            for item in found
        ]

    def _gallery(self, k: int = 1) -> Gallery:
        """The gallery, for a search of `k` items."""
        if self.gallery is None:
            raise NotFound("this Bento has no gallery: package it with `clipflow package --gallery DIR`")
        check_k(k, self.limits)
        return self.gallery

    def _rank(self, queries: torch.Tensor, candidates: torch.Tensor) -> list[list[Match]]:
        return [
            [Match(index=m.index, cosine=m.cosine, probability=m.probability) for m in row]
            for row in encoder.rank(queries, candidates, self.encoder.logit_scale)
        ]


class StoreDown(Overloaded):
    """The vector store did not answer: 503 with a `Retry-After`, and the reason as the message."""

    def __init__(self, message: str) -> None:
        ServiceUnavailable.__init__(self, message)  # Overloaded's own message says the server is busy; it is not
        self.retry_after_s = STORE_RETRY_AFTER_S


def _refused(refusal: Overloaded) -> Overloaded:
    """`refusal`, noted where `ShedMiddleware` finds it: BentoML answers every 5xx with one generic message."""
    notices = SHED.get()
    if notices is not None:
        notices.append(refusal)
    return refusal


def _searcher(settings: str | None) -> store.QueryBatcher | None:
    """The vector store searcher of a Bento packaged with an index (`settings`: its `IndexParams` as JSON), at
    `$CLIPFLOW_INDEX_URI` when set."""
    if settings is None:
        if os.environ.get(INDEX_URI_ENV):
            logger.warning(
                "%s is set, but this Bento was packaged without an index: search reads its gallery", INDEX_URI_ENV
            )
        return None
    params = IndexParams(**json.loads(settings))
    params = dataclasses.replace(params, uri=os.environ.get(INDEX_URI_ENV) or params.uri)
    logger.info("search reads the vector store's alias %s", params.alias)  # the uri may hold credentials
    return store.QueryBatcher(store.Searcher(params))


# The first added runs first: every refusal under /v1/ is reshaped for OpenAI's clients, the page
# and the probes pass, then a request without the key is refused before anything else, and an
# OpenAI request passes the body gates before it is handed on to a native endpoint.
Clipflow.add_asgi_middleware(openai_api.ErrorShapeMiddleware)
Clipflow.add_asgi_middleware(PageMiddleware, page=PAGE, docs_title=API_DOCS.title)
Clipflow.add_asgi_middleware(ApiKeyMiddleware)
Clipflow.add_asgi_middleware(RequestGateMiddleware, max_bytes=ARGS.max_request_bytes)
Clipflow.add_asgi_middleware(
    openai_api.EmbeddingsMiddleware,
    served=served_model,
    limits=limits,
    text_path="/encode_text",
    image_path="/encode_image_base64",
    max_fetch_bytes=ARGS.max_request_bytes,
)
Clipflow.add_asgi_middleware(ShedMiddleware)
# The model endpoints that are not batched: BentoML runs `threads` of them at once and queues the rest.
UNBATCHED = frozenset({"/classify", "/rank", "/rank_texts", "/search", "/search_image"})
Clipflow.add_asgi_middleware(AdmissionMiddleware, paths=UNBATCHED, workers=usable_cores(), max_waiting=ARGS.max_waiting)
