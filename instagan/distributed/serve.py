"""Online translation on Ray Serve: one deployment wrapping instagan.infer.Translator, with dynamic batching
(jobs/serve.py parses the arguments and calls build_app and run).

    python jobs/serve.py --checkpoint CKPT [--direction a2b] [--num-replicas 1] [--device cpu] [--max-batch 8]
    curl -s http://127.0.0.1:8000/healthz
    curl -s -X POST http://127.0.0.1:8000/translate -H 'Content-Type: application/json' -d @request.json

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
import io
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve

from data_prep.rows import IMAGE_FORMATS, MASK_FORMATS, BadInput, open_image, rgb_array
from instagan.checkpoint import validate as validate_checkpoint
from instagan.config import AMP, amp_dtype
from instagan.infer import DIRECTIONS as DIRECTION_NETS
from instagan.infer import Translator

APP_NAME = "instagan"
FIELDS = {"image", "masks"}
MASK_THRESHOLD = 128  # the authors' mask PNGs carry grey resampled pixels (data_prep's folder source does the same)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 32 * 1024**2  # request body (base64 inflates files by 4/3)
    max_instances: int = 50  # masks per request
    max_pixels: int = 4096 * 4096  # per image or mask, checked from the header before decoding
    # image + all its masks, checked from the headers before decoding: a replica's decoded input is at most
    # max_batch x this (about 4 bytes a pixel in the model's float tensors)
    max_request_pixels: int = 8 * 2048 * 2048


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- decoding and encoding (plain functions: no Ray needed to test them) --------------------------------------

def _open(b64, what: str, limits: Limits) -> Image.Image:
    """base64 text -> an image opened from its header only (PNG, JPEG or WebP; masks PNG), its pixel count checked
    against max_pixels; raises BadRequest."""
    if not isinstance(b64, str):
        raise BadRequest(400, f"{what}: expected a base64 string, got {type(b64).__name__}")
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


def decode_request(body: bytes, limits: Limits = Limits()) -> tuple[np.ndarray, np.ndarray]:
    """A /translate body -> (uint8 (H, W, 3) RGB, bool (K, H, W)); raises BadRequest(status, message)."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "body is not a request: JSON nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest(400, f"body must be a JSON object with keys image and masks, got {type(req).__name__}")
    missing, unknown = sorted(FIELDS - req.keys()), sorted(req.keys() - FIELDS)
    if missing or unknown:
        raise BadRequest(400, "body must have exactly the keys image and masks:"
                              + (f" missing {missing}" if missing else "") + (f" unknown {unknown}" if unknown else ""))
    if not isinstance(req["masks"], list):
        raise BadRequest(400, f"masks: expected a list of base64 strings, got {type(req['masks']).__name__}")
    if len(req["masks"]) > limits.max_instances:
        raise BadRequest(422, f"masks: {len(req['masks'])} instances, the limit is {limits.max_instances}")
    # Every header first: the request's decoded size is known, and bounded, before any pixel is decoded.
    img_im = _open(req["image"], "image", limits)
    mask_ims = [_open(b64, f"masks[{k}]", limits) for k, b64 in enumerate(req["masks"])]
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


def encode_result(result) -> dict:
    """An ArrayTranslation -> the JSON answer (without time_s)."""
    return {"image": png_b64(result.img), "masks": [png_b64(m) for m in result.masks],
            "translated": [bool(t) for t in result.translated]}


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
api = FastAPI(title="InstaGAN translation", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(api)
class InstaGANServer:
    def __init__(self, checkpoint: str, direction: str = "a2b", device: str = "cpu", ins_max: int = 20,
                 ins_per: int = 2, size: int | None = None, max_batch: int = 8, batch_wait_s: float = 0.02,
                 limits: dict | None = None, threads: int = 0, amp: str = "none"):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.tr = Translator.from_checkpoint(checkpoint, direction, ins_max=ins_max, ins_per=ins_per, device=device,
                                             amp_dtype=amp_dtype(amp))
        self.direction, self.size, self.max_batch = direction, size, max_batch
        self.limits = Limits(**(limits or {}))
        self.translate_batch.set_max_batch_size(max_batch)
        self.translate_batch.set_batch_wait_timeout_s(batch_wait_s)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "pid": os.getpid(), "direction": self.direction, "mask_mode": self.tr.mask_mode,
                "size": "native" if self.size == 0 else self.size or self.tr.config.data.size,
                "max_batch": self.max_batch, "limits": asdict(self.limits)}

    @api.post("/translate")
    async def translate(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            body = await read_body(request, self.limits.max_bytes)
            item = await asyncio.to_thread(decode_request, body, self.limits)
        except BadRequest as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        try:
            result, batch = await self.translate_batch(item)
            if isinstance(result, Exception):
                raise result
            answer = await asyncio.to_thread(encode_result, result)
        except Exception as e:  # this request fails; the replica and the other requests go on
            return JSONResponse({"error": f"translation failed: {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({**answer, "direction": self.direction, "batch": batch,
                             "time_s": round(time.perf_counter() - t0, 4)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # both reset from the constructor's arguments
    async def translate_batch(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list:
        # One model call for the batch; if it fails, each item alone, so only the failing items' requests fail.
        results = await asyncio.to_thread(self.tr.translate_each, items, self.size, len(items))
        return [(r, len(items)) for r in results]


def build_app(checkpoint: str, direction: str = "a2b", num_replicas: int = 1, device: str = "cpu",
              max_batch: int = 8, batch_wait_s: float = 0.02, ins_max: int = 20, ins_per: int = 2,
              size: int | None = None, limits: Limits = Limits(), num_cpus: float = 1.0, threads: int = 0,
              amp: str = "none"):
    """The Serve application (pass to serve.run). size None: the model's training size; 0: native size.
    threads: torch threads per replica (0: the default, which Ray sets from num_cpus); amp: none, bf16 or fp16."""
    if amp not in AMP:
        raise ValueError(f"amp must be one of {sorted(AMP)}, got {amp!r}")
    validate_checkpoint(checkpoint, (DIRECTION_NETS[direction],) if direction in DIRECTION_NETS else ())
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    actor = {"num_cpus": num_cpus, **({"num_gpus": 1} if device.startswith("cuda") else {})}
    return InstaGANServer.options(num_replicas=num_replicas, max_ongoing_requests=2 * max_batch,
                                  ray_actor_options=actor).bind(
        str(Path(checkpoint).resolve()), direction, device, ins_max, ins_per, size, max_batch, batch_wait_s,
        asdict(limits), threads, amp)


def run(app, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, detach: bool = False,
        banner: str = "") -> int:
    """Start Serve's HTTP proxy on host:port (Ray: the cluster at address, else a local instance) and run `app`;
    block until Ctrl-C or SIGTERM, then delete it (detach: leave it running and return). -> exit status."""
    from instagan.distributed.launch import init_ray

    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"[serve] http://{host}:{port}/translate ready{banner}; GET /healthz; Ctrl-C stops", flush=True)
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

