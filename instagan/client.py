"""An HTTP client of the Serve app (instagan.distributed.serve): a collection's items as request bodies, at most a
bounded number of requests in flight, results written per item, or a latency benchmark. jobs/serve_client.py has
the user's view. No Ray here.

    items = read_items("/tmp/shp2gir", "a2b", split="sample")          # [(id, body or the reason there is none)]
    summary = translate_collection("http://127.0.0.1:8000", items, "/tmp/out", concurrency=8)

api_key: for a server started with --api-key-env, sent as the X-API-Key header on every POST /translate;
check_server finds a missing or wrong key before the collection starts.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import requests
from PIL import Image
from tqdm import tqdm

from data_prep.rows import UsageError
from instagan.data import decode_masks
from instagan.inputs import iter_input_rows, resolve_input

RETRY_STATUS = {502, 503, 504}
MAX_SHOWN = 20  # failures listed in the printed summary


# ---- inputs: (id, request body, or the reason there is none) -------------------------------------------------------

def png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_body(image: bytes, masks: Iterable[bytes] | None) -> bytes:
    """Encoded image file bytes and mask PNG bytes -> the JSON body of POST /translate; masks None leaves the key
    out (a server with a segmenter predicts them)."""
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    body = {"image": b64(image)} if masks is None else {"image": b64(image), "masks": [b64(m) for m in masks]}
    return json.dumps(body).encode()


def read_items(path: str | Path, direction: str = "a2b", split: str | None = None, kind: str = "auto",
               images: str | None = None, a: str | None = None, b: str | None = None,
               threshold: int = 128, unmasked: bool = False) -> Iterator[tuple[str, bytes | str]]:
    """Yield (id, body) for each image of `direction`'s source domain, read by jobs/translate.py's readers (Parquet
    set, InstaGAN folder, COCO json, image folder); body is a str, the reason, for an input those readers rejected.
    The stored image bytes are sent as they are, masks as PNGs. unmasked (a server with a segmenter): images without
    masks are listed too (`resolve_input`'s unmasked) and sent without the "masks" key, so the server predicts them.
    Lazy. Raises UsageError when the input itself is unusable."""
    source = resolve_input(path, kind, direction, split, images, a, b, threshold, unmasked=unmasked)  # raises now
    return _bodies(source, unmasked)


def _bodies(source, unmasked: bool = False) -> Iterator[tuple[str, bytes | str]]:
    for row in iter_input_rows(source):
        problems = json.loads(row.get("problems") or "[]")
        if row["image"] is None:
            yield row["id"], "; ".join(f"{q['reason']}: {q['detail']}" for q in problems) or "unreadable"
            continue
        if unmasked and not row["masks"]:
            yield row["id"], make_body(row["image"], None)
            continue
        try:
            masks = decode_masks(row["masks"] or [], row["height"], row["width"])
            yield row["id"], make_body(row["image"], [png_bytes(m) for m in masks])
        except Exception as e:
            yield row["id"], f"bad_masks: {type(e).__name__}: {e}"


# ---- requests ------------------------------------------------------------------------------------------------------

_local = threading.local()


def headers(api_key: str | None = None) -> dict:
    return {"Content-Type": "application/json", **({"X-API-Key": api_key} if api_key else {})}


def post(url: str, body: bytes, timeout: float = 300.0, retries: int = 3,
         api_key: str | None = None) -> tuple[int, dict]:
    """POST one body to <url>/translate -> (HTTP status, JSON answer); retries connection errors and 502-504."""
    session = getattr(_local, "session", None) or requests.Session()
    _local.session = session
    for attempt in range(retries + 1):
        try:
            r = session.post(f"{url.rstrip('/')}/translate", data=body, timeout=timeout, headers=headers(api_key))
        except requests.ConnectionError as e:
            if attempt == retries:
                return 0, {"error": f"connection failed: {e}"}
        except requests.RequestException as e:  # timeouts and the like: not retried (the server may be busy with it)
            return 0, {"error": f"request failed: {type(e).__name__}: {e}"}
        else:
            if r.status_code not in RETRY_STATUS or attempt == retries:
                try:
                    return r.status_code, r.json()
                except ValueError:
                    return r.status_code, {"error": r.text[:500]}
        time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def check_server(url: str, timeout: float = 10.0, api_key: str | None = None) -> dict:
    """GET <url>/healthz -> its JSON; raises UsageError when the server does not answer 200, or refuses the API key
    (an empty POST /translate: the server answers 401 for the key before it reads the body, else 400)."""
    try:
        r = requests.get(f"{url.rstrip('/')}/healthz", timeout=timeout)
        r.raise_for_status()
        health = r.json()
        probe = requests.post(f"{url.rstrip('/')}/translate", data=b"", timeout=timeout, headers=headers(api_key))
    except (requests.RequestException, ValueError) as e:
        raise UsageError(f"server {url} is not answering /healthz: {e}") from None
    if probe.status_code == 401:
        why = "wrong key" if api_key else "none sent: give --api-key-env NAME"
        raise UsageError(f"server {url} refused the API key ({why}): {probe.text[:200]}")
    return health


def bounded(items: Iterable, fn: Callable, concurrency: int) -> Iterator[tuple[object, Future]]:
    """Run fn(item) in threads with at most `concurrency` in flight; yield (item, done future) as they finish.
    Items are pulled from the iterable only when a slot frees up, so a large collection is never all in memory."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: dict[Future, object] = {}
        items = iter(items)
        while True:
            for item in itertools.islice(items, concurrency - len(pending)):
                pending[pool.submit(fn, item)] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield pending.pop(f), f


def write_result(out: Path, iid: str, answer: dict) -> None:
    """<out>/images/<id>.png, <out>/masks/<id>_<k>.png, and for masks the server predicted
    <out>/predicted_masks/<id>_<k>.png (masks[k] translates predicted_masks[k]); ids with a / make sub-folders."""
    files = {out / "images" / f"{iid}.png": answer["image"]}
    files.update({out / "masks" / f"{iid}_{k}.png": m for k, m in enumerate(answer["masks"])})
    files.update({out / "predicted_masks" / f"{iid}_{k}.png": m
                  for k, m in enumerate(answer.get("predicted_masks") or [])})
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


def translate_collection(url: str, items: Iterable[tuple[str, bytes | str]], out: str | Path, concurrency: int = 8,
                         timeout: float = 300.0, api_key: str | None = None, progress: bool = True) -> dict:
    """Translate (id, body) items through the server into `out`; returns a summary (counts, failures by id).
    progress: a tqdm bar on stderr (done, failed, rate); failures are printed above it as they come."""
    out = Path(out)
    for d in ("images", "masks"):
        (out / d).mkdir(parents=True, exist_ok=True)

    def one(item: tuple[str, bytes | str]) -> dict:
        iid, body = item
        if isinstance(body, str):
            return {"id": iid, "status": None, "error": body}
        t0 = time.perf_counter()
        status, answer = post(url, body, timeout, api_key=api_key)
        rec = {"id": iid, "status": status, "latency_s": round(time.perf_counter() - t0, 4)}
        if status != 200:
            return {**rec, "error": answer.get("error", str(answer))}
        try:
            write_result(out, iid, answer)
        except (OSError, ValueError, KeyError) as e:
            return {**rec, "error": f"could not write the result: {type(e).__name__}: {e}"}
        return {**rec, "masks": len(answer["masks"]), "translated": sum(answer["translated"]),
                **({"predicted": True} if answer.get("predicted") else {})}

    t0, ok, failed = time.perf_counter(), 0, {}
    bar = tqdm(desc="[client] translated", unit="image", disable=not progress, file=sys.stderr,
               total=len(items) if hasattr(items, "__len__") else None)
    with open(out / "results.jsonl", "w") as log, bar:
        for _, f in bounded(items, one, concurrency):
            rec = f.result()
            log.write(json.dumps(rec) + "\n")
            if "error" in rec:
                failed[rec["id"]] = f"{rec['status']}: {rec['error']}"
                bar.write(f"[client] {rec['id']}: failed ({rec['status']}): {rec['error']}", file=sys.stderr)
            else:
                ok += 1
            bar.update()
            bar.set_postfix(failed=len(failed), refresh=False)
    wall = time.perf_counter() - t0
    shown = dict(list(failed.items())[:MAX_SHOWN])  # all of them are in results.jsonl
    return {"ok": ok, "failed": len(failed), "failures": shown, "wall_s": round(wall, 2),
            "images_per_s": round(ok / wall, 3) if wall > 0 else None, "out": str(out)}


def bench(url: str, bodies: list[bytes], n: int, concurrency: int = 8, warmup: int | None = None,
          timeout: float = 300.0, api_key: str | None = None) -> dict:
    """n requests cycling over `bodies`, `concurrency` in flight, after `warmup` untimed ones (default: concurrency).
    Returns latency percentiles (client-side seconds per request) and throughput (ok answers per second)."""
    def one(body: bytes) -> tuple[int, float, float | None]:
        t0 = time.perf_counter()
        status, answer = post(url, body, timeout, api_key=api_key)
        return status, time.perf_counter() - t0, answer.get("time_s")

    warmup = concurrency if warmup is None else warmup
    for _ in bounded(itertools.islice(itertools.cycle(bodies), warmup), one, concurrency):
        pass
    t0 = time.perf_counter()
    runs = [f.result() for _, f in bounded(itertools.islice(itertools.cycle(bodies), n), one, concurrency)]
    wall = time.perf_counter() - t0
    lat = np.array([r[1] for r in runs if r[0] == 200])
    server = np.array([r[2] for r in runs if r[0] == 200 and r[2] is not None])
    pct = lambda a, q: round(float(np.percentile(a, q)), 4) if len(a) else None  # noqa: E731
    return {"url": url, "concurrency": concurrency, "requests": n, "ok": int(len(lat)), "failed": n - len(lat),
            "statuses": sorted({r[0] for r in runs}), "wall_s": round(wall, 3),
            "images_per_s": round(len(lat) / wall, 3), "p50_s": pct(lat, 50), "p90_s": pct(lat, 90),
            "p99_s": pct(lat, 99), "mean_s": round(float(lat.mean()), 4) if len(lat) else None,
            "server_p50_s": pct(server, 50)}
