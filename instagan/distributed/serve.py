"""Online translation on Ray Serve: one deployment wrapping instagan.infer.Translator, with dynamic batching
(jobs/serve.py parses the arguments and calls build_app and run).

    python jobs/serve.py --checkpoint CKPT [--direction a2b] [--num-replicas 1] [--device cpu] [--max-batch 8]
    curl -s http://127.0.0.1:8000/healthz
    curl -s -X POST http://127.0.0.1:8000/translate -H 'Content-Type: application/json' -d @request.json
    curl -s http://127.0.0.1:8000/openapi.json       # the schema (TranslateRequest, TranslateResponse, errors); /docs

POST /translate takes JSON {"image": "<base64 PNG/JPEG/WebP>", "masks": ["<base64 PNG>", ...]} (one mask per
instance, the image's size; a pixel is an instance pixel when its brightest channel is >= 128; "masks" may be empty;
16-bit grey images are scaled to 8 bits) and answers
{"image": "<base64 PNG>", "masks": [...], "translated": [bool, ...], "direction": "a2b", "batch": 3,
"time_s": 0.41} (batch: the images in the model call that carried it; time_s: seconds in the replica): the
translated image at the input's size and one mask per input mask (mask k translates input mask k; translated[k] is
false for instances past --ins-max, which come back as sent; baselines: /healthz's mask_mode "union" answers one
union mask, "none" the input masks). Errors answer {"error": "..."} with 400 (bad JSON, nested too deeply,
missing or wrong-typed fields, not base64, not an image), 413 (body over --max-bytes, image or mask over
--max-pixels, image + masks over --max-request-pixels: all read from the headers before any pixel is decoded),
415 (an image format other than PNG, JPEG, WebP, or a mask other than PNG: Pillow tries no other decoder), 422
(mask size differs from the image, an empty mask, more than --max-instances masks) or 500 (the model failed on
this request; other requests, and the replica, go on). GET /healthz answers 200 with the served direction.

Requests without masks (jobs/serve.py --segmenter FILE [--category NAME]): leave "masks" out (or null) and the
replica's instagan.segment.InstanceSegmenter predicts them (one batched call for the requests of a batch that have
none, then the same Translator call); the answer adds "predicted": true, "predicted_masks" (by decreasing score;
masks[k] translates predicted_masks[k]) and "scores". Nothing found is 422 naming the category and thresholds. A
server without a segmenter answers 400 to a request without "masks"; "masks": [] always means "no instances".
The pydantic models below describe the request and the answers in /openapi.json and /docs; the body is still read
as bytes (size checks first) and then validated with TranslateRequest, so a huge body is refused before parsing.

API key (optional; jobs/serve.py --api-key-env NAME, required there when --host is not loopback): every POST
/translate carries it as `X-API-Key: KEY` or `Authorization: Bearer KEY`, else 401 {"error": ...}. It is checked
first, before the size checks and before any byte of the body is read. The deployment is bound with the key's
SHA-256 only (the key itself is not among the arguments Serve stores) and compares digests with
hmac.compare_digest. GET /healthz (which says api_key_required), /openapi.json and /docs stay open.

Every request is decoded and validated in the ingress before it joins a batch; `@serve.batch` hands up to
--max-batch valid items to one Translator.translate_arrays call, run in a thread so the replica keeps answering
(health checks, 4xx) while the model works. max_ongoing_requests is twice the batch: one batch runs while the next
fills. Send collections with jobs/serve_client.py, which keeps a bounded number of requests in flight.

Ray: --address (or RAY_ADDRESS) connects to a cluster, else a local Ray starts. Serve's HTTP proxy binds --host
(127.0.0.1 by default) and --port; the script blocks until Ctrl-C, then deletes the app (--detach leaves it running
on a cluster and exits).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import base64
import binascii
import hashlib
import heapq
import hmac
import io
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from data_prep.rows import IMAGE_FORMATS, MASK_FORMATS, BadInput, open_image, rgb_array
from instagan.checkpoint import validate as validate_checkpoint
from instagan.config import AMP, amp_dtype
from instagan.infer import DIRECTIONS as DIRECTION_NETS
from instagan.infer import Translator

APP_NAME = "instagan"
MASK_THRESHOLD = 128  # the authors' mask PNGs carry grey resampled pixels (data_prep's folder source does the same)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 32 * 1024**2  # request body (base64 inflates files by 4/3)
    max_instances: int = 50  # masks per request
    max_pixels: int = 4096 * 4096  # per image or mask, checked from the header before decoding
    # image + all its masks, checked from the headers before decoding: a replica's decoded input is at most
    # max_batch x this (about 4 bytes a pixel in the model's float tensors)
    max_request_pixels: int = 8 * 2048 * 2048


# ---- the wire format, as pydantic models: /openapi.json and /docs describe POST /translate with them -------------

class TranslateRequest(BaseModel):
    """POST /translate's JSON body."""
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(description="the photo: base64 of a PNG, JPEG or WebP file (16-bit grey is scaled to 8 bits)")
    masks: list[str] | None = Field(  # fail_fast: a list of a million non-strings is one error, not a million
        default=None, fail_fast=True,
        description="one base64 PNG per instance, the image's size (a pixel is an instance pixel when its brightest "
                    "channel is >= 128); may be empty; at most max_instances (GET /healthz's limits). Left out (or "
                    "null) on a server started with --segmenter (GET /healthz's segmenter): the server predicts them")


FIELDS = set(TranslateRequest.model_fields)
REQUIRED = {k for k, f in TranslateRequest.model_fields.items() if f.is_required()}


class TranslateResponse(BaseModel):
    """POST /translate's answer (200)."""
    image: str = Field(description="the translated image: base64 PNG at the input's size")
    masks: list[str] = Field(description="base64 0/255 PNGs, one per input mask: mask k translates input mask k")
    translated: list[bool] = Field(description="false for instances past --ins-max, whose mask comes back as sent")
    predicted: bool = Field(False, description="true when the request had no masks and the server's segmenter "
                                               "predicted them")
    predicted_masks: list[str] = Field(
        [], description="the predicted instance masks (base64 0/255 PNGs, by decreasing score; masks[k] translates "
                        "predicted_masks[k]); empty when the request sent masks")
    scores: list[float] = Field([], description="the segmenter's score of each predicted mask")
    direction: str = Field(description="a2b or b2a")
    batch: int = Field(description="images in the model call that carried this one")
    time_s: float = Field(description="seconds in the replica")


class ErrorResponse(BaseModel):
    """Every 4xx and 500 answer of POST /translate."""
    error: str = Field(description="the field and the reason")


ERRORS = {
    400: "bad JSON (or nested too deeply), missing, unknown or wrong-typed fields, not base64, not an image, a corrupt "
         "image, an invalid Content-Length",
    401: "a missing or wrong API key (only when the server has one): sent before any byte of the body is read",
    413: "a body over max_bytes (from Content-Length, or while it streams in), an image or mask over max_pixels, or "
         "image + masks over max_request_pixels: read from the headers before any pixel is decoded",
    415: "an image other than PNG, JPEG or WebP, or a mask other than PNG (no other decoder is tried)",
    422: "a mask whose size differs from the image, an empty mask, more than max_instances masks, an image under 4x4; "
         "without masks: the segmenter found no instance",
    500: "the model failed on this request (other requests, and the replica, go on)",
}
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key, when the server has one")
BEARER = HTTPBearer(auto_error=False, description="the same key as a bearer token: Authorization: Bearer KEY")
TRANSLATE_DOC = {
    "summary": "Translate one image and its instance masks",
    "response_model": TranslateResponse,
    "responses": {200: {"description": "the translation"},
                  **{s: {"model": ErrorResponse, "description": d} for s, d in ERRORS.items()},
                  503: {"description": "Serve's back-pressure (its proxy answers, not this route): retry later"}},
    # The body is read by hand (size checks first), so FastAPI does not see a body parameter: describe it here.
    # security: X-API-Key, or a bearer token, or nothing ({}) for a server started without a key.
    "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
        "schema": TranslateRequest.model_json_schema()}}}, "security": [{}]},
}
MIN_KEY_CHARS = 16


def api_key_digest(key: str) -> str:
    """The SHA-256 the replica keeps and compares (hex); raises ValueError for a key unfit for an HTTP header."""
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or key != key.strip():
        raise ValueError(f"the API key must be at least {MIN_KEY_CHARS} printable ASCII characters without leading or "
                         "trailing spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_from_env(env_name: str | None, host: str, environ=os.environ) -> str | None:
    """jobs/serve.py's key: the value of the environment variable `env_name` (never a command-line value, which
    `ps` shows), or None without one. Raises ValueError when the variable is unset or empty, or when there is no
    key and `host` is not a loopback address (127.0.0.1, ::1, localhost)."""
    if env_name:
        key = environ.get(env_name)
        if not key:
            raise ValueError("--api-key-env: that environment variable is not set, or empty (the option takes the "
                             "variable's NAME, e.g. INSTAGAN_API_KEY, never the key itself)")
        api_key_digest(key)  # fails here, before Ray starts
        return key
    if not is_loopback(host):
        raise ValueError(f"--host {host} is not a loopback address: the server would be open to the network. "
                         "Give it an API key in an environment variable: export INSTAGAN_API_KEY=...; "
                         "python jobs/serve.py --api-key-env INSTAGAN_API_KEY ...")
    return None


def presented_key(x_api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    """The key a request carries: X-API-Key, else an Authorization: Bearer token, else None."""
    return x_api_key if x_api_key is not None else bearer.credentials if bearer is not None else None


def authorized(presented: str | None, digest: str | None) -> str | None:
    """None when the request may pass (the key matches, or the server has none), else the 401 message."""
    if digest is None:
        return None
    if presented is None:
        return "missing API key: send the header X-API-Key: KEY or Authorization: Bearer KEY"
    sent = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
    return None if hmac.compare_digest(sent, digest) else "wrong API key"


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- decoding and encoding (plain functions: no Ray needed to test them) --------------------------------------

def _open(b64: str, what: str, limits: Limits) -> Image.Image:
    """base64 text -> an image opened from its header only (PNG, JPEG or WebP; masks PNG), its pixel count checked
    against max_pixels; raises BadRequest."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(400, f"{what}: not valid base64 ({e})") from None
    try:
        im = open_image(data, IMAGE_FORMATS if what == "image" else MASK_FORMATS)
    except BadInput as e:
        status = {"unsupported_format": 415, "too_large": 413}.get(e.reason, 400)
        raise BadRequest(status, f"{what}: {len(data)} bytes, {e.reason}: {e.detail}") from None
    if im.width * im.height > limits.max_pixels:
        raise BadRequest(413, f"{what}: {im.width}x{im.height} is over the limit of {limits.max_pixels} pixels")
    return im


def _decode(im: Image.Image, what: str) -> np.ndarray:
    """Decode an opened image: uint8 (H, W, 3) RGB for the image (16-bit grey scaled, not clipped), the brightest
    channel (H, W) for a mask; raises BadRequest(400) for data that is corrupt past the header."""
    try:
        im.load()
        return rgb_array(im) if what == "image" else np.asarray(_mask_plane(im))
    except Exception as e:  # truncated or corrupt data past the header, or a mode that does not convert
        raise BadRequest(400, f"{what}: the image data is corrupt ({type(e).__name__}: {e})") from None


def _mask_plane(im: Image.Image) -> Image.Image:
    """A mask in any mode -> "L" holding its brightest channel (how data_prep reads masks)."""
    if im.mode in ("L", "1"):
        return im.convert("L")
    if im.mode[0] in "IF":  # 16-bit or float: 0-65535 scaled to 8 bits, as data_prep does
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray((a / 257 if a.max() > 255 else a).clip(0, 255).astype(np.uint8))
    return Image.fromarray(np.asarray(im.convert("RGB")).max(-1))


def parse_request(body: bytes) -> TranslateRequest:
    """A /translate body -> a TranslateRequest; raises BadRequest(400). The keys are checked before the model sees
    the object, so an object with a million unknown keys costs one set difference, not a million errors."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "body is not a request: JSON nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest(400, f"body must be a JSON object with keys image and masks, got {type(req).__name__}")
    missing, unknown = sorted(REQUIRED - req.keys()), req.keys() - FIELDS
    if missing or unknown:
        said = f" missing {missing}" if missing else ""
        if unknown:  # 5 named at most: a million unknown keys must not make a megabyte of message
            said += f" unknown {heapq.nsmallest(5, unknown)}" + (" and more" if len(unknown) > 5 else "")
        raise BadRequest(400, "body must have the key image, and masks (unless the server predicts them), and no "
                              "other:" + said)
    try:
        return TranslateRequest.model_validate(req)
    except ValidationError as e:  # 2 errors at most: both keys are known, masks fails fast
        said = "; ".join(f"{_where(x['loc'])}: {x['msg']}" for x in e.errors(include_url=False))
        raise BadRequest(400, said) from None


def _where(loc: tuple) -> str:
    """pydantic's error location -> "masks[3]"."""
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")


def decode_request(body: bytes, limits: Limits = Limits(), predicts: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """A /translate body -> (uint8 (H, W, 3) RGB, bool (K, H, W)), or (image, None) when the request has no masks
    and the server `predicts` them (it has a segmenter); raises BadRequest(status, message)."""
    req = parse_request(body)
    if req.masks is None:
        if not predicts:
            raise BadRequest(400, "masks: missing; this server has no segmenter to predict them (jobs/serve.py "
                                  "--segmenter): send one base64 PNG per instance")
        img = _decode(_open(req.image, "image", limits), "image")
        try:
            Translator.check_item(img, np.zeros((0, *img.shape[:2]), bool))
        except ValueError as e:
            raise BadRequest(422, str(e)) from None
        return img, None
    if len(req.masks) > limits.max_instances:
        raise BadRequest(422, f"masks: {len(req.masks)} instances, the limit is {limits.max_instances}")
    # Every header first: the request's decoded size is known, and bounded, before any pixel is decoded.
    img_im = _open(req.image, "image", limits)
    mask_ims = [_open(b64, f"masks[{k}]", limits) for k, b64 in enumerate(req.masks)]
    w, h = img_im.size
    for k, im in enumerate(mask_ims):
        if im.size != (w, h):
            raise BadRequest(422, f"masks[{k}]: {im.height}x{im.width} differs from the image's {h}x{w}")
    pixels = w * h * (1 + len(mask_ims))
    if pixels > limits.max_request_pixels:
        raise BadRequest(413, f"image and {len(mask_ims)} masks of {h}x{w} are {pixels} pixels, over the limit of "
                              f"{limits.max_request_pixels} per request")
    img = _decode(img_im, "image")
    masks = np.zeros((len(mask_ims), h, w), bool)
    for k, im in enumerate(mask_ims):
        masks[k] = _decode(im, f"masks[{k}]") >= MASK_THRESHOLD
        if not masks[k].any():  # data_prep quarantines such masks too
            raise BadRequest(422, f"masks[{k}]: empty (no pixel >= {MASK_THRESHOLD}): send only masks of instances")
    try:
        Translator.check_item(img, masks)
    except ValueError as e:
        raise BadRequest(422, str(e)) from None
    return img, masks


def png_b64(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) or bool (H, W) -> base64 PNG (masks as 0/255 grey)."""
    im = Image.fromarray(pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # vs the default 6: 2.4x less CPU, 6% larger (sheep sample)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_result(result, found=None) -> dict:
    """An ArrayTranslation (and the segmenter's Instances it translated, if predicted) -> the JSON answer (without
    direction, batch and time_s)."""
    answer = {"image": png_b64(result.img), "masks": [png_b64(m) for m in result.masks],
              "translated": [bool(t) for t in result.translated]}
    if found is not None:
        answer.update(predicted=True, predicted_masks=[png_b64(m) for m in found.masks],
                      scores=[round(float(x), 4) for x in found.scores])
    return answer


def segment_and_translate(tr, seg, items: list[tuple[np.ndarray, np.ndarray | None]], size: int | None) -> list:
    """One batch of decoded requests -> per item (ArrayTranslation, Instances or None), or the exception that item
    failed with (BadRequest 422 when the segmenter found nothing). Items without masks get the segmenter's (one
    batched call); then one Translator call for all (each item alone if it fails)."""
    out: list = [None] * len(items)
    need = [i for i, (_, masks) in enumerate(items) if masks is None]
    found = dict(zip(need, seg.predict_each([items[i][0] for i in need]) if need else []))
    ready = []
    for i, (img, masks) in enumerate(items):
        f = found.get(i)
        if isinstance(f, Exception):
            out[i] = RuntimeError(f"segmenter failed: {type(f).__name__}: {f}")
        elif f is not None and not len(f.masks):
            out[i] = BadRequest(422, f"masks: none sent, and {seg.nothing_found()}")
        else:
            ready.append((i, (img, masks if f is None else f.masks)))
    results = tr.translate_each([item for _, item in ready], size, len(ready)) if ready else []
    for (i, _), r in zip(ready, results):
        out[i] = r if isinstance(r, Exception) else (r, found.get(i))
    return out


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past max_bytes by its Content-Length or, without one, while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, f"invalid Content-Length {declared!r}")
        if int(declared) > max_bytes:
            raise BadRequest(413, f"body of {declared} bytes is over the limit of {max_bytes}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise BadRequest(413, f"body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the deployment -----------------------------------------------------------------------------------------------

# serve.ingress freezes a copy of the FastAPI app (and so of the handlers' globals) when the class is decorated:
# every module-level name the handlers use must be defined above this point.
api = FastAPI(title="InstaGAN translation", docs_url="/docs", redoc_url=None,
              description="POST /translate: one image and its instance masks in, the translation out "
                          "(instagan.distributed.serve). GET /healthz: the direction, the limits, and whether an "
                          "API key is required (X-API-Key: KEY or Authorization: Bearer KEY).")


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="instagan"'} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(api)
class InstaGANServer:
    def __init__(self, checkpoint: str, direction: str = "a2b", device: str = "cpu", ins_max: int = 20,
                 ins_per: int = 2, size: int | None = None, max_batch: int = 8, batch_wait_s: float = 0.02,
                 limits: dict | None = None, threads: int = 0, amp: str = "none",
                 api_key_sha256: str | None = None, segmenter: dict | None = None, compile: bool = False):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.tr = Translator.from_checkpoint(checkpoint, direction, ins_max=ins_max, ins_per=ins_per, device=device,
                                             amp_dtype=amp_dtype(amp, device), compile=compile)
        self.direction, self.size, self.max_batch = direction, size, max_batch
        self.limits = Limits(**(limits or {}))
        self.seg, self.seg_info = None, None
        if segmenter:
            from instagan.segment import InstanceSegmenter

            self.seg = InstanceSegmenter.from_file(**segmenter, max_instances=self.limits.max_instances,
                                                   device=device, batch_size=max_batch)
            self.seg_info = {"file": segmenter["path"], "arch": self.seg.arch, "category": self.seg.category,
                             "score_threshold": self.seg.score_threshold, "min_area": self.seg.min_area}
        self.api_key_sha256 = api_key_sha256
        self.translate_batch.set_max_batch_size(max_batch)
        self.translate_batch.set_batch_wait_timeout_s(batch_wait_s)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "pid": os.getpid(), "direction": self.direction, "mask_mode": self.tr.mask_mode,
                "size": "native" if self.size == 0 else self.size or self.tr.config.data.size,
                "max_batch": self.max_batch, "limits": asdict(self.limits),
                "api_key_required": self.api_key_sha256 is not None, "segmenter": self.seg_info}

    # No body parameter: FastAPI would read and parse the whole body before the key and size checks (TRANSLATE_DOC
    # describes it instead). The two Security parameters only read headers, and put the schemes in /openapi.json.
    @api.post("/translate", **TRANSLATE_DOC)
    async def translate(self, request: Request, x_api_key: str | None = Security(API_KEY_HEADER),
                        bearer: HTTPAuthorizationCredentials | None = Security(BEARER)) -> JSONResponse:
        t0 = time.perf_counter()
        refused = authorized(presented_key(x_api_key, bearer), self.api_key_sha256)
        if refused:
            return _error(401, refused)
        try:
            body = await read_body(request, self.limits.max_bytes)
            item = await asyncio.to_thread(decode_request, body, self.limits, self.seg is not None)
        except BadRequest as e:
            return _error(e.status, e.message)
        try:
            result, batch = await self.translate_batch(item)
            if isinstance(result, BadRequest):
                return _error(result.status, result.message)
            if isinstance(result, Exception):
                raise result
            answer = await asyncio.to_thread(encode_result, *result)
        except Exception as e:  # this request fails; the replica and the other requests go on
            return _error(500, f"translation failed: {type(e).__name__}: {e}")
        answer = TranslateResponse(**answer, direction=self.direction, batch=batch,
                                   time_s=round(time.perf_counter() - t0, 4))
        return JSONResponse(answer.model_dump())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # both reset from the constructor's arguments
    async def translate_batch(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list:
        # One segmenter call for the items without masks, one model call for the batch; if one fails, each item
        # alone, so only the failing items' requests fail.
        results = await asyncio.to_thread(segment_and_translate, self.tr, self.seg, items, self.size)
        return [(r, len(items)) for r in results]


def build_app(checkpoint: str, direction: str = "a2b", num_replicas: int = 1, device: str = "cpu",
              max_batch: int = 8, batch_wait_s: float = 0.02, ins_max: int = 20, ins_per: int = 2,
              size: int | None = None, limits: Limits = Limits(), num_cpus: float = 1.0, threads: int = 0,
              amp: str = "none", api_key: str | None = None, segmenter: dict | None = None,
              compile: bool = False):
    """The Serve application (pass to serve.run). size None: the model's training size; 0: native size.
    threads: torch threads per replica (0: the default, which Ray sets from num_cpus); amp: none, bf16 or fp16.
    api_key: what POST /translate requires (None: nothing); only its SHA-256 is bound into the deployment.
    segmenter: {"path", "category", "score_threshold", "min_area"} (InstanceSegmenter.from_file's arguments): each
    replica loads it and predicts the masks of requests without any; loaded here first, so a bad file or category
    fails before Serve starts. compile: each replica's Translator compiles its generator (one compile per batch
    and image shape: with size None every batch of n images has one shape; the first requests of each wait)."""
    digest = None if api_key is None else api_key_digest(api_key)
    if segmenter:
        from instagan.segment import InstanceSegmenter

        segmenter = {**segmenter, "path": str(Path(segmenter["path"]).resolve())}
        InstanceSegmenter.from_file(**segmenter)
    if amp not in AMP:
        raise ValueError(f"amp must be one of {sorted(AMP)}, got {amp!r}")
    validate_checkpoint(checkpoint, (DIRECTION_NETS[direction],) if direction in DIRECTION_NETS else ())
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    actor = {"num_cpus": num_cpus, **({"num_gpus": 1} if device.startswith("cuda") else {})}
    return InstaGANServer.options(num_replicas=num_replicas, max_ongoing_requests=2 * max_batch,
                                  ray_actor_options=actor).bind(
        str(Path(checkpoint).resolve()), direction, device, ins_max, ins_per, size, max_batch, batch_wait_s,
        asdict(limits), threads, amp, digest, segmenter, compile)


def run(app, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, detach: bool = False,
        banner: str = "") -> int:
    """Start Serve's HTTP proxy on host:port (Ray: the cluster at address, else a local instance) and run `app`;
    block until Ctrl-C or SIGTERM, then delete it (detach: leave it running and return). -> exit status."""
    from instagan.distributed.launch import init_ray

    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"[serve] http://{host}:{port}/translate ready{banner}; GET /healthz, /docs; Ctrl-C stops", flush=True)
    if detach:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it like Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("[serve] stopping", flush=True)
        serve.delete(APP_NAME)
    return 0

