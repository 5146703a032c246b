"""jobs/serve.py and jobs/serve_client.py (instagan.distributed.serve, instagan.client): a real Serve app on
loopback with an API key, real photos, malformed requests, the key's checks, the OpenAPI schema, the client."""

import base64
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from data_prep.rows import UsageError
from instagan.infer import Translator
from instagan import client
from instagan.distributed.serve import Limits
from jobs import serve as serve_job
from jobs import serve_client
from tests.conftest import tiny_checkpoint

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "shp2gir_coco_sample"
# The sample has up to 8 sheep; its largest request (256 x 256, 8 masks) is 589,824 pixels.
LIMITS = Limits(max_bytes=1_000_000, max_instances=8, max_pixels=400 * 400, max_request_pixels=640_000)
MAX_BATCH = 4
KEY = "test-key-0123456789abcdef"  # the module's app requires it
AUTH = {"X-API-Key": KEY}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(iid: str) -> tuple[bytes, list[bytes]]:
    """A sheep photo's file bytes and its instance mask files (sorted by k)."""
    masks = sorted((SAMPLE / "sampleA_seg").glob(f"{iid}_*.png"), key=lambda p: int(p.stem.split("_")[-1]))
    return (SAMPLE / "sampleA" / f"{iid}.png").read_bytes(), [m.read_bytes() for m in masks]


def body(image: bytes, masks: list[bytes]) -> bytes:
    return json.dumps({"image": b64(image), "masks": [b64(m) for m in masks]}).encode()


def decode(answer: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    img = np.array(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
    return img, [np.array(Image.open(io.BytesIO(base64.b64decode(m)))) for m in answer["masks"]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 64)


@pytest.fixture(scope="module")
def url(ray_local, ckpt):
    from ray import serve

    from instagan.distributed.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(ckpt), max_batch=MAX_BATCH, batch_wait_s=0.05, limits=LIMITS, api_key=KEY),
                  name="instagan_test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_translates_real_photos_with_dynamic_batching(url):
    image, masks = photo("139")  # 4 sheep
    r = requests.post(f"{url}/translate", data=body(image, masks), headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    out, out_masks = decode(answer)
    src = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
    assert out.shape == src.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - src).mean() > 1  # translated, not echoed
    assert len(out_masks) == len(masks) == 4 and answer["translated"] == [True] * 4
    assert all(m.shape == src.shape[:2] and set(np.unique(m)) <= {0, 255} for m in out_masks)

    # 8 concurrent requests (twice the batch): some share a model call, and each answer is the one it gets alone
    ids = ["139", "1106", "1134", "1271", "602", "732", "866", "139"]
    answers: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i, iid=iid: answers.__setitem__(
        i, requests.post(f"{url}/translate", data=body(*photo(iid)), headers=AUTH, timeout=120).json()))
        for i, iid in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("image" in a for a in answers.values()), answers
    assert max(a["batch"] for a in answers.values()) > 1
    assert max(a["batch"] for a in answers.values()) <= MAX_BATCH
    for i in (0, 7):
        img_i, masks_i = decode(answers[i])
        assert np.abs(img_i.astype(int) - out).max() <= 2  # batch composition changes float sums only
        assert all(((a > 0) != (b > 0)).mean() < 0.01 for a, b in zip(masks_i, out_masks))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n"


def malformed(n: int = 50) -> list[tuple[str, dict, int]]:
    """n malformed /translate requests as (name, requests.post kwargs, expected status)."""
    image, masks = photo("1106")  # 256 x 256, 2 sheep
    small = png(np.zeros((32, 32), np.uint8))
    rgb = np.zeros((64, 64, 3), np.uint8)
    big = png(np.zeros((500, 500, 3), np.uint8))  # few bytes, too many pixels
    truncated = image[: len(image) // 2]
    cases = [
        ("bad JSON", {"data": b'{"image": "abc", "masks": ['}, 400),
        ("not UTF-8", {"data": b"\xff\xfe{}"}, 400),
        ("empty body", {"data": b""}, 400),
        ("JSON list", {"json": [b64(image)]}, 400),
        ("missing masks", {"json": {"image": b64(image)}}, 400),
        ("missing image", {"json": {"masks": []}}, 400),
        ("unknown key", {"json": {"image": b64(image), "masks": [], "mask": []}}, 400),
        ("image not a string", {"json": {"image": 7, "masks": []}}, 400),
        ("masks not a list", {"json": {"image": b64(image), "masks": b64(masks[0])}}, 400),
        ("bad base64", {"json": {"image": "@@not base64@@", "masks": []}}, 400),
        ("not an image", {"json": {"image": b64(b"hello, this is text" * 20), "masks": []}}, 400),
        ("truncated image", {"json": {"image": b64(truncated), "masks": []}}, 400),
        ("mask not an image", {"json": {"image": b64(image), "masks": [b64(b"\x00" * 100)]}}, 400),
        ("mask wrong size", {"json": {"image": b64(image), "masks": [b64(masks[0]), b64(small)]}}, 422),
        ("too many instances", {"json": {"image": b64(image), "masks": [b64(masks[0])] * 9}}, 422),
        ("too many pixels", {"json": {"image": b64(big), "masks": []}}, 413),
        ("oversize body", {"data": b"{" + b" " * 1_100_000 + b"}"}, 413),
        ("oversize chunked body", {"chunks": [b"{" + b" " * 600_000] * 2}, 413),  # sent without Content-Length
        ("image too small", {"json": {"image": b64(png(np.zeros((2, 2, 3), np.uint8))), "masks": []}}, 422),
        ("deeply nested JSON", {"data": b"[" * 100_000 + b"]" * 100_000}, 400),
        ("empty mask", {"json": {"image": b64(image), "masks": [b64(masks[0]), b64(png(np.zeros((256, 256),
                                                                                            np.uint8)))]}}, 422),
        # formats no decoder is tried for (EPS would run Ghostscript where it is installed)
        ("EPS image", {"json": {"image": b64(EPS), "masks": []}}, 415),
        ("GIF image", {"json": {"image": b64(png(rgb, "GIF")), "masks": []}}, 415),
        ("BMP image", {"json": {"image": b64(png(rgb, "BMP")), "masks": []}}, 415),
        ("TIFF image", {"json": {"image": b64(png(rgb, "TIFF")), "masks": []}}, 415),
        ("PSD header", {"json": {"image": b64(b"8BPS\x00\x01" + b"\x00" * 64), "masks": []}}, 415),
        ("FITS header", {"json": {"image": b64(b"SIMPLE  =                    T" + b" " * 50), "masks": []}}, 415),
        ("SGI header", {"json": {"image": b64(b"\x01\xda\x01\x01\x00\x03" + b"\x00" * 500), "masks": []}}, 415),
        ("IM header", {"json": {"image": b64(b"Image type: RGB image\r\nName: x\r\n\x1a" + b"\x00" * 500),
                                "masks": []}}, 415),
        ("JPEG mask", {"json": {"image": b64(image), "masks": [b64(png(np.full((256, 256), 255, np.uint8),
                                                                       "JPEG"))]}}, 415),
        ("over the request pixel budget", {"json": {"image": b64(png(np.zeros((390, 390, 3), np.uint8))),
                                                    "masks": [b64(png(np.full((390, 390), 255, np.uint8)))] * 4}},
         413),
    ]
    return [cases[i % len(cases)] for i in range(n)]


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_the_replica_survives(url):
    before = requests.get(f"{url}/healthz", timeout=30).json()
    rss_before = rss_bytes(before["pid"])
    seen = set()
    for name, kwargs, status in malformed(1000):
        if "chunks" in kwargs:  # a generator body goes out chunked
            kwargs = {"data": iter(kwargs["chunks"])}
        r = requests.post(f"{url}/translate", timeout=60, headers=AUTH, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()["error"], name
        seen.add(name)
    assert len(seen) == 31
    image, masks = photo("1106")
    r = requests.post(f"{url}/translate", data=body(image, masks), headers=AUTH, timeout=120)
    assert r.status_code == 200 and len(r.json()["masks"]) == 2
    after = requests.get(f"{url}/healthz", timeout=30)
    assert after.status_code == 200 and after.json()["pid"] == before["pid"]  # the same replica process
    grown = rss_bytes(before["pid"]) - rss_before
    print(f"replica RSS {rss_before / 1e6:.0f} MB before 1000 malformed requests, {grown / 1e6:+.0f} MB after")
    assert grown < 150e6, grown  # no request's pixels were decoded past its budget, nothing piles up


def rss_bytes(pid: int) -> int:
    """Resident set size of a local process (the Serve replica runs on this machine)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_decoding_checks_every_header_and_the_request_budget_before_any_pixel():
    from instagan.distributed.serve import BadRequest, decode_request

    # A 16-bit grey image is scaled to 8 bits, not clipped to white.
    grey16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    mask = png(np.pad(np.full((16, 16), 255, np.uint8), 24))
    img, masks = decode_request(body(png(grey16), [mask]), LIMITS)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img[..., 0], np.round(grey16 / 257).astype(np.uint8))
    assert masks.shape == (1, 64, 64) and masks.sum() == 256
    # Over the budget, refused from the headers: the masks' pixel data (cut off here) is never decoded.
    cut = png(np.full((390, 390), 255, np.uint8))[:200]
    with pytest.raises(BadRequest) as err:
        decode_request(body(png(np.zeros((390, 390, 3), np.uint8)), [cut] * 4), LIMITS)
    assert err.value.status == 413 and "640000" in err.value.message
    with pytest.raises(BadRequest) as err:  # within the budget the same cut mask is found corrupt
        decode_request(body(png(np.zeros((390, 390, 3), np.uint8)), [cut]), LIMITS)
    assert err.value.status == 400 and "masks[0]" in err.value.message
    with pytest.raises(BadRequest) as err:
        decode_request(body(EPS, []), LIMITS)
    assert err.value.status == 415 and "EPS" in err.value.message and "PNG" in err.value.message


@pytest.mark.slow
def test_client_translates_a_folder_bounded_and_reports_bad_items(url, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    shutil.copytree(SAMPLE / "sampleA", src / "sampleA")
    shutil.copytree(SAMPLE / "sampleA_seg", src / "sampleA_seg")
    (src / "sampleA" / "broken.png").write_bytes(b"not a png at all")
    (src / "sampleA_seg" / "broken_0.png").write_bytes((SAMPLE / "sampleA_seg" / "1106_0.png").read_bytes())
    monkeypatch.setenv("INSTAGAN_TEST_KEY", KEY)
    rc = serve_client.main(["--url", url, "--input", str(src), "--out", str(tmp_path / "out"), "--concurrency", "3",
                            "--api-key-env", "INSTAGAN_TEST_KEY"])
    assert rc == 1  # one item failed, the others went on
    err = capsys.readouterr().err
    assert "[client] broken: failed" in err and "[client] translated: 8image" in err and "failed=1" in err, err
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert len(records) == 8 and records["broken"]["status"] is None  # data_prep's reader rejected it, not sent
    assert "unreadable" in records["broken"]["error"]
    for iid, rec in records.items():
        if iid == "broken":
            continue
        n = len(list((SAMPLE / "sampleA_seg").glob(f"{iid}_*.png")))
        assert rec["status"] == 200 and rec["masks"] == n
        out = Image.open(tmp_path / "out" / "images" / f"{iid}.png")
        assert out.size == Image.open(SAMPLE / "sampleA" / f"{iid}.png").size
        assert len(list((tmp_path / "out" / "masks").glob(f"{iid}_*.png"))) == n

    stats = client.bench(url, [body(*photo("1106")), body(*photo("139"))], n=8, concurrency=4, warmup=2, api_key=KEY)
    assert stats["ok"] == 8 and stats["failed"] == 0 and 0 < stats["p50_s"] <= stats["p99_s"]
    assert stats["images_per_s"] > 0


def raw_post(url: str, head: str, timeout: float = 30) -> str:
    """Send only a POST /translate's request line and headers (no body) and return the status line: an answer
    proves the server did not wait for the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"POST /translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}\r\n".encode())
        return s.makefile("rb").readline().decode().strip()


@pytest.mark.slow
def test_api_key_is_checked_before_the_body_and_the_schema_describes_translate(url, monkeypatch):
    # Wrong or missing key: 401 for bodies that would be 400 or 413, so the body was never decoded...
    for headers, why in [({"X-API-Key": KEY + "x"}, "wrong"), ({"Authorization": f"Bearer {KEY[:-1]}"}, "wrong"),
                         ({}, "missing"), ({"Authorization": f"Basic {KEY}"}, "missing")]:
        for data in (b'{"image": "@@not base64@@", "masks": []}', b"not json", b"{" + b" " * 1_100_000 + b"}"):
            r = requests.post(f"{url}/translate", data=data, headers=headers, timeout=60)
            assert r.status_code == 401 and why in r.json()["error"], (headers, r.status_code, r.text[:200])
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # ...nor read: the answer comes with only the headers sent (a key check after the body would wait here).
    assert raw_post(url, "Content-Length: 100\r\n") == "HTTP/1.1 401 Unauthorized"
    assert raw_post(url, f"X-API-Key: {KEY}\r\nContent-Length: 100000000\r\n").startswith("HTTP/1.1 413 ")
    # The right key, in either header, reaches the decoder (400) and the model (200).
    r = requests.post(f"{url}/translate", data=b"not json", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.post(f"{url}/translate", data=body(*photo("1106")), headers={"Authorization": f"bearer {KEY}"},
                      timeout=120)
    assert r.status_code == 200, r.text
    assert requests.get(f"{url}/healthz", timeout=30).json()["api_key_required"] is True

    # /openapi.json (open without a key) describes POST /translate: the body, the answer, the errors, the key.
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    op = spec["paths"]["/translate"]["post"]
    req = op["requestBody"]["content"]["application/json"]["schema"]
    assert op["requestBody"]["required"] and req["required"] == ["image"]  # masks may be left out: predicted
    assert req["properties"]["image"]["type"] == "string"
    assert {"type": "array", "items": {"type": "string"}} in req["properties"]["masks"]["anyOf"]  # or null
    assert req["additionalProperties"] is False
    assert {"200", "400", "401", "413", "415", "422", "500"} <= op["responses"].keys()
    ok = spec["components"]["schemas"][op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
                                       .split("/")[-1]]
    assert set(ok["properties"]) == set(r.json()) == {"image", "masks", "translated", "direction", "batch", "time_s",
                                                      "predicted", "predicted_masks", "scores"}
    assert r.json()["predicted"] is False and r.json()["predicted_masks"] == []
    assert op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemes = spec["components"]["securitySchemes"]
    assert {"X-API-Key": "APIKeyHeader", "bearer": "HTTPBearer"} == {
        schemes["APIKeyHeader"]["name"]: "APIKeyHeader", schemes["HTTPBearer"]["scheme"]: "HTTPBearer"}
    assert {"APIKeyHeader": []} in op["security"] and {"HTTPBearer": []} in op["security"]
    docs = requests.get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "openapi.json" in docs.text

    # The client finds a missing or wrong key before it sends anything.
    with pytest.raises(UsageError, match="none sent"):
        client.check_server(url)
    with pytest.raises(UsageError, match="wrong key"):
        client.check_server(url, api_key=KEY + "x")
    assert client.check_server(url, api_key=KEY)["direction"] == "a2b"
    monkeypatch.setenv("INSTAGAN_TEST_KEY", KEY + "x")
    assert serve_client.main(["--url", url, "--input", str(SAMPLE), "--bench", "1",
                              "--api-key-env", "INSTAGAN_TEST_KEY"]) == 2
    monkeypatch.delenv("INSTAGAN_TEST_KEY")
    assert serve_client.main(["--url", url, "--input", str(SAMPLE), "--bench", "1",
                              "--api-key-env", "INSTAGAN_TEST_KEY"]) == 2


def test_serve_job_needs_a_key_from_the_environment_off_loopback(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(serve_job, "build_app", lambda *a, **kw: calls.append(a) or "app")
    monkeypatch.setattr(serve_job, "run", lambda app, host, *a: calls.append(host) or 0)
    monkeypatch.delenv("INSTAGAN_TEST_KEY", raising=False)
    job = lambda *extra: serve_job.main(["--checkpoint", "ckpt", *extra])  # noqa: E731
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.org"):
        assert job("--host", host) == 2 and "not a loopback address" in capsys.readouterr().err
    assert job("--host", "0.0.0.0", "--api-key-env", "INSTAGAN_TEST_KEY") == 2  # named, but not set
    assert "not set" in capsys.readouterr().err
    monkeypatch.setenv("INSTAGAN_TEST_KEY", "short")
    assert job("--host", "0.0.0.0", "--api-key-env", "INSTAGAN_TEST_KEY") == 2
    assert "at least 16" in capsys.readouterr().err
    assert calls == []  # refused before anything was built or started
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):  # loopback: a key is optional
        assert job("--host", host) == 0 and calls[-2][-2] is None and calls[-1] == host
    monkeypatch.setenv("INSTAGAN_TEST_KEY", KEY)
    assert job("--host", "0.0.0.0", "--api-key-env", "INSTAGAN_TEST_KEY") == 0
    assert calls[-2][-2] == KEY and calls[-1] == "0.0.0.0" and calls[-2][-1] is None  # no segmenter
    assert job("--category", "sheep") == 2 and "--category is for --segmenter" in capsys.readouterr().err


def test_request_model_errors_are_400_and_bounded():
    from instagan.distributed.serve import BadRequest, TranslateRequest, decode_request

    for data, where in [(b'{"image": 7, "masks": []}', "image:"), (b'{"image": "", "masks": "abc"}', "masks:"),
                        (b'{"image": "", "masks": ["", null]}', "masks[1]:"),
                        (b'{"image": null, "masks": []}', "image:")]:
        with pytest.raises(BadRequest) as err:
            decode_request(data, LIMITS)
        assert err.value.status == 400 and err.value.message.startswith(where), err.value.message
    # a million wrong-typed masks or unknown keys: one short message, not a million errors
    for data in (b'{"image": "", "masks": [' + b",".join([b"1"] * 1_000_000) + b"]}",
                 b"{" + b",".join(b'"k%d": 0' % i for i in range(1_000_000)) + b"}"):
        t0 = time.perf_counter()
        with pytest.raises(BadRequest) as err:
            decode_request(data, LIMITS)
        assert err.value.status == 400 and len(err.value.message) < 300 and time.perf_counter() - t0 < 10
    assert TranslateRequest.model_json_schema()["additionalProperties"] is False


def test_bounded_keeps_at_most_concurrency_in_flight():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def work(i):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return i * i

    pulled = []
    items = (pulled.append(i) or i for i in range(40))
    results = sorted(f.result() for _, f in client.bounded(items, work, 3))
    assert results == [i * i for i in range(40)] and state["peak"] == 3 and len(pulled) == 40


def test_a_failing_item_fails_alone(ckpt):
    tr = Translator.from_checkpoint(str(ckpt))
    good = (np.zeros((40, 48, 3), np.uint8), np.ones((1, 40, 48), bool))
    bad = (np.zeros((40, 48, 3), np.float32), np.ones((1, 40, 48), bool))  # the wrong dtype: translate_arrays raises
    out = tr.translate_each([good, bad, good], None, 3)
    assert isinstance(out[1], ValueError) and "uint8" in str(out[1])
    assert out[0].img.shape == (40, 48, 3) and np.array_equal(out[0].img, out[2].img)


# ---- requests without masks: a server with a segmenter (jobs/serve.py --segmenter) -------------------------------

SEG_IDS = [590, 591, 592, 593]  # generated images of domain a (the segmenter's test split)


@pytest.fixture(scope="module")
def seg_url(url, ckpt, small_segmenter):
    """A second app on the same Serve instance (route /seg, no API key) with the session's small segmenter of the
    generated ellipses (conftest.small_segmenter)."""
    from ray import serve

    from instagan.distributed.serve import build_app

    seg = {"path": str(small_segmenter[1] / "segmenter.pt"), "category": None, "score_threshold": 0.3,
           "min_area": 16}
    serve.run(build_app(str(ckpt), max_batch=MAX_BATCH, batch_wait_s=0.2, limits=LIMITS, segmenter=seg),
              name="instagan_seg", route_prefix="/seg")
    yield f"{url}/seg"
    serve.delete("instagan_seg")


def test_a_request_without_masks_needs_a_server_that_predicts_them():
    from instagan.distributed.serve import BadRequest, decode_request
    from instagan.synthetic import make_image

    img = make_image("a", SEG_IDS[0], 64)[0]
    data = json.dumps({"image": b64(png(img))}).encode()
    with pytest.raises(BadRequest) as err:
        decode_request(data, LIMITS)
    assert err.value.status == 400 and "no segmenter" in err.value.message
    for request in (data, json.dumps({"image": b64(png(img)), "masks": None}).encode()):
        got, masks = decode_request(request, LIMITS, predicts=True)
        assert masks is None and (got == img).all()
    got, masks = decode_request(json.dumps({"image": b64(png(img)), "masks": []}).encode(), LIMITS, predicts=True)
    assert masks.shape == (0, 64, 64)  # [] still means "no instances", not "predict"


@pytest.mark.slow
def test_the_server_predicts_missing_masks_and_translates_them(seg_url, small_segmenter):
    from instagan.segment_train import match_instances
    from instagan.synthetic import make_image

    health = requests.get(f"{seg_url}/healthz", timeout=30).json()
    assert health["segmenter"]["category"] == "ellipse" and health["segmenter"]["score_threshold"] == 0.3
    blank = np.full((64, 64, 3), 128, np.uint8)
    requests_ = [{"image": b64(png(make_image("a", i, 64)[0]))} for i in SEG_IDS] + [{"image": b64(png(blank))}]
    given_img, given_masks = make_image("a", SEG_IDS[0], 64)
    requests_.append({"image": b64(png(given_img)), "masks": [b64(png(m.astype(np.uint8) * 255))
                                                              for m in given_masks]})
    answers: dict[int, requests.Response] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: answers.__setitem__(
        i, requests.post(f"{seg_url}/translate", json=r, timeout=120))) for i, r in enumerate(requests_)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recalls = []
    for n, i in enumerate(SEG_IDS):
        r = answers[n]
        assert r.status_code == 200, r.text
        a = r.json()
        img, out_masks = decode(a)
        predicted = np.stack([np.array(Image.open(io.BytesIO(base64.b64decode(m)))) > 0
                              for m in a["predicted_masks"]])
        assert a["predicted"] is True and img.shape == (64, 64, 3)
        assert len(predicted) == len(out_masks) == len(a["scores"]) == len(a["translated"]) >= 1
        assert min(a["scores"]) >= 0.3 and a["scores"] == sorted(a["scores"], reverse=True)
        true = make_image("a", i, 64)[1]
        recalls.append(len(match_instances(predicted, true)) / len(true))
    assert np.mean(recalls) >= 0.5, recalls  # the predicted masks are the objects, not noise
    assert max(answers[n].json()["batch"] for n in range(len(SEG_IDS))) > 1  # segmented and translated in batches
    nothing = answers[len(SEG_IDS)]
    assert nothing.status_code == 422 and "found no ellipse" in nothing.json()["error"], nothing.text
    given = answers[len(SEG_IDS) + 1].json()
    assert given["predicted"] is False and given["predicted_masks"] == [] and len(given["masks"]) == len(given_masks)
    # malformed requests are still 4xx on a server that predicts, and the replica goes on
    for bad, status in (({"image": "@@"}, 400), ({"image": b64(png(blank)), "masks": "x"}, 400),
                        ({"image": b64(png(np.zeros((2, 2, 3), np.uint8)))}, 422), ({"masks": []}, 400)):
        r = requests.post(f"{seg_url}/translate", json=bad, timeout=60)
        assert r.status_code == status, (bad, r.status_code, r.text[:200])
    assert requests.post(f"{seg_url}/translate", json=requests_[0], timeout=60).status_code == 200


def test_a_bad_segmenter_stops_the_serve_job_before_serve_starts(ckpt, tmp_path, capsys, monkeypatch):
    from instagan.segment import InstanceSegmenter, build_model

    monkeypatch.setattr(serve_job, "run", lambda *a: pytest.fail("Serve started"))
    path = InstanceSegmenter(build_model("small", 2), "small", ["__background__", "ellipse"], layout="scratch").save(
        tmp_path / "seg.pt")
    for extra, words in ((["--segmenter", str(tmp_path / "none.pt")], "none.pt not found"),
                         (["--segmenter", str(path), "--category", "sheep"], "unknown category"),
                         (["--segmenter", str(path), "--score-threshold", "2"], "score threshold must be in [0, 1]")):
        assert serve_job.main(["--checkpoint", str(ckpt), *extra]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_the_client_sends_images_without_masks_to_a_server_that_predicts_them(seg_url, tmp_path):
    """jobs/serve_client.py against a server with a segmenter: an InstaGAN folder whose images half have mask files
    and half have none; every image comes back translated, the maskless ones with their predicted masks written
    to predicted_masks/ and flagged in results.jsonl, the others with their own masks."""
    from instagan.synthetic import make_image

    for sub in ("testA", "testA_seg"):
        (tmp_path / "src" / sub).mkdir(parents=True)
    for n, i in enumerate(SEG_IDS):
        img, masks = make_image("a", i, 64)
        Image.fromarray(img).save(tmp_path / "src" / "testA" / f"{i}.png")
        if n % 2 == 0:
            for k, m in enumerate(masks):
                Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "src" / "testA_seg" / f"{i}_{k}.png")
    out = tmp_path / "out"
    assert serve_client.main(["--url", seg_url, "--input", str(tmp_path / "src"), "--out", str(out)]) == 0
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {str(i) for i in SEG_IDS} and all(r["status"] == 200 for r in rows.values())
    for n, i in enumerate(SEG_IDS):
        predicted = sorted((out / "predicted_masks").glob(f"{i}_*.png")) if (out / "predicted_masks").exists() else []
        translated = sorted((out / "masks").glob(f"{i}_*.png"))
        assert (out / "images" / f"{i}.png").exists()
        if n % 2 == 0:
            assert not predicted and "predicted" not in rows[str(i)]
            assert len(translated) == len(make_image("a", i, 64)[1])
        else:
            assert rows[str(i)]["predicted"] is True and len(predicted) == len(translated) >= 1
