"""The HTTP/JSON API at ``/v1/patient-ml``, shaped like the public Patient ML Service API.

Routes are thin: authenticate, call one ``pml.commands`` function (mutations, predict,
artifact download: audited there) or a read function, convert. Handlers are plain ``def``s,
so FastAPI runs their blocking store and blob calls in its thread pool.
"""

import base64
import binascii
import json
import re
from typing import Annotated, Any, Iterator, TypeVar, cast

from fastapi import Body, Depends, FastAPI, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from pml import commands, models, runs
from pml.app import App
from pml.commands import Caller
from pml.errors import InvalidArgument, NotFound, Unauthenticated
from pml.gateway.auth import account_caller
from pml.gateway import paging
from pml.gateway.paging import DEFAULT_PAGE, MAX_PAGE
from pml.http import convert, errors
from pml.http.schemas import (
    ApprovalBody,
    ApprovalRequest,
    CreateModelResponse,
    CreateRunResponse,
    LabelPrediction,
    ModelBody,
    ModelList,
    PredictRequest,
    PredictResponse,
    RunBody,
    RunList,
)
from pml.schemas.config import ModelConfig, ProblemType
from pml.store.tables import Run

PREFIX = "/v1/patient-ml"
OPENAPI_PATH = f"{PREFIX}/openapi.json"
ARTIFACT_CHUNK = 256 * 1024

# Ids pml issues are hex; anything else cannot name an object, so it is simply not found
# (and odd bytes such as NUL never reach the database).
_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
# Fields of a model body that the server sets; a client may send a fetched model back as is.
_READ_ONLY = ("id", "accountId", "championId", "deployedId", "created", "updated")

T = TypeVar("T")

DESCRIPTION = """\
pml's HTTP/JSON API, shaped like the public Patient ML Service API: a client written for
that API works by changing its base URL (and the image URIs in its configs).

**Auth**: `Authorization: Bearer <api key>` and the account in `LifeOmic-Account` (or
`pml-account`). A key never sees another account's objects: they answer 404 like a missing id.

**Errors**: `{"code", "message", "fieldViolations": [{"field", "description"}]}` with 400
(INVALID_ARGUMENT, with the violations), 401, 403, 404, 409 (FAILED_PRECONDITION,
ALREADY_EXISTS) or 500 (no details).

**Paging**: list calls take `pageSize` (1-500, default 50) and `nextPageToken` (from the
previous page's answer; opaque); the last page has no `nextPageToken`.

**Run status**: PENDING, CURATING, TUNING, EVALUATING → `running`; COMPLETED → `succeeded`;
FAILED → `failed` (`error` = "<step>: <reason>"); CANCELLED → `failed` (`error` = "cancelled").
"""


def _check_id(value: str, kind: str) -> str:
    if not _ID.fullmatch(value):
        raise NotFound(f"{kind} {value[:80]!r} not found")
    return value


def _no_nul(data: Any, path: str = "") -> None:
    """Reject NUL characters anywhere in a body: the store cannot hold them."""
    if isinstance(data, str):
        if "\x00" in data:
            raise InvalidArgument([(path or "(body)", "must not contain NUL characters")])
    elif isinstance(data, dict):
        for key, value in data.items():
            _no_nul(key, path or "(body)")
            _no_nul(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _no_nul(value, f"{path}[{i}]")


def _config_input(data: Any) -> Any:
    if isinstance(data, bytes):  # FastAPI hands over the raw body when it is not sent as JSON
        raise InvalidArgument([("(body)", "send the config as a JSON object with Content-Type: application/json")])
    _no_nul(data)
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k not in _READ_ONLY}
    return data


def _paged(items: list[T], page_size: int, token: str) -> tuple[list[T], str | None]:
    try:
        chunk, next_token = paging.page(items, page_size, token)
    except InvalidArgument:
        raise InvalidArgument([("nextPageToken", "not a token this service issued")]) from None
    return chunk, next_token or None


def _decision(body: ApprovalRequest) -> str:
    given = [(name, value) for name, value in (("decision", body.decision), ("choice", body.choice)) if value is not None]
    if not given:
        raise InvalidArgument([("decision", "give 'approved' or 'rejected' (as decision, or choice)")])
    spelled = {"approved": "approved", "approve": "approved", "rejected": "rejected", "reject": "rejected"}
    decisions = set()
    for name, value in given:
        if value.lower() not in spelled:
            raise InvalidArgument([(name, f"must be 'approved' or 'rejected', not {value[:40]!r}")])
        decisions.add(spelled[value.lower()])
    if len(decisions) > 1:
        raise InvalidArgument([("choice", "disagrees with decision")])
    return decisions.pop()


def _same_problem(a: str, b: str) -> bool:
    short = {ProblemType.IMG_CLASSIFICATION.value: ProblemType.IMG_CLF.value}
    return short.get(a, a) == short.get(b, b)


def build_app(pml: App) -> FastAPI:
    """The ASGI app for one pml App (its store, blobs and broker)."""
    api = FastAPI(
        title="pml Patient ML API", version="1", description=DESCRIPTION, openapi_url=OPENAPI_PATH,
        docs_url=f"{PREFIX}/docs", redoc_url=None, responses=errors.ERROR_RESPONSES,
    )
    errors.install(api)

    def caller(request: Request) -> Caller:
        headers = request.headers
        account = headers.get("lifeomic-account") or headers.get("pml-account") or ""
        if not account.isascii():
            raise Unauthenticated("unknown or revoked API key for this account")
        return account_caller(pml, account, headers.get("authorization", ""), "http")

    Who = Annotated[Caller, Depends(caller)]
    PageSize = Annotated[int, Query(alias="pageSize", ge=1, le=MAX_PAGE)]
    PageToken = Annotated[str, Query(alias="nextPageToken", max_length=200)]
    config_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelConfigInput"}}}}}

    @api.post(f"{PREFIX}/models", response_model=CreateModelResponse, response_model_exclude_none=True,
              openapi_extra=config_body, tags=["models"])
    def create_model(who: Who, data: Annotated[Any, Body()]) -> CreateModelResponse:
        """Create a model config; labels get their stable id and index."""
        return CreateModelResponse(model=convert.model(commands.create_model(pml, who, _config_input(data))))

    @api.get(f"{PREFIX}/models", response_model=ModelList, response_model_exclude_none=True, tags=["models"])
    def list_models(who: Who, page_size: PageSize = DEFAULT_PAGE, token: PageToken = "") -> ModelList:
        with pml.session() as session:
            rows, next_token = _paged(models.list_models(session, who.account_id), page_size, token)
            return ModelList(items=[convert.model(r) for r in rows], next_page_token=next_token)

    @api.get(f"{PREFIX}/models/{{modelId}}", response_model=ModelBody, response_model_exclude_none=True, tags=["models"])
    def get_model(who: Who, modelId: str) -> ModelBody:  # noqa: N803 (the public API's name)
        with pml.session() as session:
            return convert.model(models.get_model(session, who.account_id, _check_id(modelId, "model")))

    @api.put(f"{PREFIX}/models/{{modelId}}", response_model=ModelBody, response_model_exclude_none=True,
             openapi_extra=config_body, tags=["models"])
    def update_model(who: Who, modelId: str, data: Annotated[Any, Body()]) -> ModelBody:  # noqa: N803
        """Replace the config. Labels are matched by name and keep id and index; new labels
        take the next index never used; runs keep the config they started with."""
        model_id = _check_id(modelId, "model")
        return convert.model(commands.update_model(pml, who, model_id, _config_input(data)))

    @api.delete(f"{PREFIX}/models/{{modelId}}", status_code=204, response_class=Response, tags=["models"])
    def delete_model(who: Who, modelId: str) -> Response:  # noqa: N803
        """Refused (409) while a run of the model is still running."""
        commands.delete_model(pml, who, _check_id(modelId, "model"))
        return Response(status_code=204)

    @api.post(f"{PREFIX}/models/{{modelId}}/runs", response_model=CreateRunResponse, tags=["runs"])
    def create_run(who: Who, modelId: str) -> CreateRunResponse:  # noqa: N803
        """Start a run: curate → tune → evaluate, on a copy of the model's current config."""
        return CreateRunResponse(run_id=commands.create_run(pml, who, _check_id(modelId, "model")).id)

    @api.get(f"{PREFIX}/models/{{modelId}}/runs", response_model=RunList, response_model_exclude_none=True, tags=["runs"])
    def list_runs(who: Who, modelId: str, page_size: PageSize = DEFAULT_PAGE, token: PageToken = "") -> RunList:  # noqa: N803
        with pml.session() as session:
            model = models.get_model(session, who.account_id, _check_id(modelId, "model"))
            rows, next_token = _paged(runs.list_runs(session, who.account_id, model.id), page_size, token)
            return RunList(items=convert.runs(session, rows), next_page_token=next_token)

    def _run_of(session: Session, who: Caller, model_id: str, run_id: str) -> Run:
        """The run, when it belongs to the model named in the path (404 otherwise)."""
        models.get_model(session, who.account_id, _check_id(model_id, "model"))
        run = runs.get_run(session, who.account_id, _check_id(run_id, "run"))
        if run.model_id != model_id:
            raise NotFound(f"run {run_id} not found")
        return run

    @api.get(f"{PREFIX}/models/{{modelId}}/runs/{{runId}}", response_model=RunBody, response_model_exclude_none=True,
             tags=["runs"])
    def get_run(who: Who, modelId: str, runId: str) -> RunBody:  # noqa: N803
        with pml.session() as session:
            return convert.runs(session, [_run_of(session, who, modelId, runId)])[0]

    @api.post(f"{PREFIX}/models/{{modelId}}/runs/{{runId}}/approvals", response_model=ApprovalBody, tags=["runs"])
    def approve(who: Who, modelId: str, runId: str, body: ApprovalRequest) -> ApprovalBody:  # noqa: N803
        """Record a final decision on a succeeded run; approving makes it the champion (and
        deploys it, for cloud models)."""
        _no_nul(body.model_dump(by_alias=True))
        decision = _decision(body)
        with pml.session() as session:
            _run_of(session, who, modelId, runId)
        return convert.approval(commands.approve_run(pml, who, runId, decision, body.description, body.user))

    @api.get(
        f"{PREFIX}/models/{{modelId}}/runs/{{runId}}/model-artifact", response_class=StreamingResponse, tags=["runs"],
        responses={200: {
            "description": "The run's model artifact (the training image's /opt/ml/model, as a tar.gz)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "X-Content-SHA256": {"description": "sha256 of the body, hex", "schema": {"type": "string"}},
                "ETag": {"description": "the sha256, quoted", "schema": {"type": "string"}},
            },
        }},
    )
    def model_artifact(who: Who, modelId: str, runId: str) -> StreamingResponse:  # noqa: N803
        """Streamed from the blob store (verified against its hash before the first byte)."""
        artifact = commands.open_artifact(pml, who, _check_id(modelId, "model"), _check_id(runId, "run"))
        sha = artifact.sha256

        def chunks() -> Iterator[bytes]:
            with open(artifact.path, "rb") as handle:
                yield from iter(lambda: handle.read(ARTIFACT_CHUNK), b"")

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
            "Content-Length": str(artifact.size), "X-Content-SHA256": sha, "ETag": f'"{sha}"',
            "Content-Disposition": f'attachment; filename="model-{runId}.tar.gz"',
        })

    @api.post(f"{PREFIX}/models/{{modelId}}/predict", response_model=PredictResponse, response_model_exclude_none=True,
              tags=["predictions"])
    def predict(who: Who, modelId: str, body: PredictRequest) -> PredictResponse:  # noqa: N803
        """Predict with the model's serving deployment (its champion), by example id or image."""
        model_id = _check_id(modelId, "model")
        _no_nul(body.model_dump(by_alias=True))
        image = None
        if body.image is not None:
            if len(body.image) > pml.settings.max_image_bytes * 4 // 3 + 4:
                raise InvalidArgument([("image", "larger than the largest image accepted")])
            try:
                image = base64.b64decode(body.image, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument([("image", "not valid base64")]) from None
        if (body.example_id is None) == (image is None):
            raise InvalidArgument([("exampleId", "give exactly one of exampleId or image")])
        if body.prediction_type is not None:
            with pml.session() as session:
                kind = models.model_config(models.get_model(session, who.account_id, model_id)).problem_definition.problem_type.value
            if not _same_problem(body.prediction_type, kind):
                raise InvalidArgument([("predictionType", f"this model predicts {kind!r}, not {body.prediction_type[:40]!r}")])
        result = commands.predict(pml, who, model_id, example_id=body.example_id, image=image)
        return PredictResponse(
            prediction_type=result.problem_type,
            predictions=[LabelPrediction(index=s.index, value=s.value, confidence=s.confidence) for s in result.labels],
            mask=base64.b64encode(result.mask_png).decode() if result.mask_png else None,
        )

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _openapi_document(api)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _openapi_document(api: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the config input schema, the auth headers, and 400 (not 422)
    for validation errors."""
    doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    config = ModelConfig.model_json_schema(by_alias=True, ref_template="#/components/schemas/ConfigInput{model}")
    for name, sub in config.pop("$defs", {}).items():
        schemas[f"ConfigInput{name}"] = sub
    config["description"] = (
        "A model config (see the README's 'Model config'). `id`, `accountId`, `championId`, `deployedId`, "
        "`created` and `updated` are ignored, so a fetched model can be sent back as is."
    )
    schemas["ModelConfigInput"] = config
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {
        "bearerKey": {"type": "http", "scheme": "bearer", "description": "An API key of the account"},
        "account": {"type": "apiKey", "in": "header", "name": "LifeOmic-Account",
                    "description": "The account id (`pml-account` is accepted too)"},
    }
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if path != OPENAPI_PATH:
                operation["security"] = [{"bearerKey": [], "account": []}]
    return doc


def openapi_document() -> dict[str, Any]:
    """The published document, without a store (routes reach the App only when called)."""
    return build_app(cast(App, None)).openapi()


if __name__ == "__main__":  # python -m pml.http.app > docs/openapi.json
    print(json.dumps(openapi_document(), indent=2))
