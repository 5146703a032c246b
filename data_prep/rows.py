"""One Parquet row per image: the schema, the mask encoding, and the checks every importer shares.

Every source (coco, folder, labelmap, synthetic) decodes its input into a `Picture` plus a list of bool masks and
hands them to `make_row`, which validates, optionally resizes (`--max-side`), encodes and returns the row or the
reasons it was quarantined. Decoding the rows back is `instagan.data.read_sample`.

Row schema (`SCHEMA`, version `SCHEMA_VERSION`):
    id        string          image id, unique within a split and domain
    image     binary          encoded image: the source file's own bytes when kept as is (JPEG/PNG, RGB or grey,
                              not resized), else PNG (lossless sources) or JPEG quality 95 (JPEG sources)
    format    string          "JPEG" or "PNG"
    height    int32, width int32
    masks     list<binary>    one per instance: COCO compressed RLE `counts` (pycocotools, column-major) of a
                              (height, width) mask; decode with pycocotools.mask.decode({"size": [h, w], "counts": c})
    areas     list<int64>     pixel count of each mask, same order as `masks` (the source's order)
    category  string          category name(s) of the instances, comma-joined
    source    string          where the row came from (file path or generator)

Why RLE and not PNG: on the synthetic 200x200 set a mask takes a median 128 bytes as RLE against 404 as PNG and
decodes in ~65 us against ~195 us (measured here), and it is the COCO format users already have.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_util

SCHEMA_VERSION = 1
MASK_ENCODING = "coco_rle"
SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("format", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("masks", pa.list_(pa.binary())), ("areas", pa.list_(pa.int64())),
    ("category", pa.string()), ("source", pa.string()),
])


class UsageError(Exception):
    """The inputs themselves are unusable (no annotation file, unknown domain category...): exit code 2."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class BadInput(Exception):
    """An input that is skipped with one quarantine row: `reason` is a short fixed token, `detail` free text."""

    def __init__(self, reason: str, detail: str = ""):
        detail = _ADDRESS.sub("", detail)  # "<_io.BytesIO object at 0x7f...>": the same reason reads the same
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Options:
    """Choices shared by every source (all picklable: they travel to the worker processes)."""
    max_side: int | None = None  # resize so that max(height, width) <= max_side (never upscale)
    image_format: str = "keep"  # keep | png | jpeg
    min_area: int = 1  # instances with fewer pixels (at source resolution) are dropped and counted, not quarantined
    jpeg_quality: int = 95


@dataclass
class Result:
    """What one conversion task sends back to the parent process."""
    rows: list[tuple[str, str, dict]] = field(default_factory=list)  # (split, domain, row)
    quarantine: list[dict] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def bad(self, id: str, source: str, reason: str, detail: str = "", kind: str = "image") -> None:
        self.quarantine.append(quarantine_row(id, source, reason, detail, kind))

    def image(self, id: str, path: str | Path) -> "Picture | None":
        """The decoded image at `path`, or None with the reason quarantined (missing or unreadable file)."""
        try:
            return load_image(Path(path))
        except BadInput as e:
            self.bad(id, str(path), e.reason, e.detail)
            return None


def quarantine_row(id: str, source: str, reason: str, detail: str = "", kind: str = "image") -> dict:
    """One line of quarantine.jsonl. kind: image (the whole row is skipped), instance (one mask), file, label."""
    return {"id": str(id), "source": str(source), "reason": reason, "detail": detail, "kind": kind}


class Picture:
    """A decoded source image, with its original bytes so that an unchanged JPEG/PNG is stored without re-encoding."""

    def __init__(self, image: Image.Image, raw: bytes | None = None):
        self.image, self.raw = image, raw
        self.format = image.format if raw is not None else None
        self._cache: dict = {}

    @classmethod
    def from_array(cls, rgb: np.ndarray) -> "Picture":
        return cls(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB"))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the source image."""
        return self.image.height, self.image.width

    def target_size(self, max_side: int | None) -> tuple[int, int]:
        h, w = self.size
        if not max_side or max(h, w) <= max_side:
            return h, w
        scale = max_side / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def encoded(self, opts: Options) -> tuple[bytes, str, int, int]:
        """(bytes, format, height, width) of the stored image; computed once per Picture (coco reuses it for a, b)."""
        if "enc" not in self._cache:
            self._cache["enc"] = self._encode(opts)
        return self._cache["enc"]

    def _encode(self, opts: Options) -> tuple[bytes, str, int, int]:
        h, w = self.target_size(opts.max_side)
        same = (h, w) == self.size
        keep = (opts.image_format == "keep" and same and self.raw is not None and self.format in ("JPEG", "PNG")
                and self.image.mode in ("RGB", "L"))
        if keep:
            return self.raw, self.format, h, w
        img = Image.fromarray(rgb_array(self.image))
        if not same:
            img = img.resize((w, h), Image.BICUBIC)
        fmt = {"png": "PNG", "jpeg": "JPEG"}.get(opts.image_format, "JPEG" if self.format == "JPEG" else "PNG")
        buf = io.BytesIO()
        if fmt == "JPEG":
            img.save(buf, "JPEG", quality=opts.jpeg_quality)
        else:
            img.save(buf, "PNG", compress_level=1)  # level 1: 3-4x faster than the default, files ~10% larger
        return buf.getvalue(), fmt, h, w


# Untrusted images are decoded only as these formats: Pillow tries no other plugin (no EPS, which would run
# Ghostscript, no PSD, FITS, SGI, IM ...). Masks: PNG only.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MASK_FORMATS = ("PNG",)
_MAGIC = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%!PS": "EPS/PostScript",
          b"\xc5\xd0\xd3\xc6": "EPS", b"8BPS": "PSD", b"SIMPLE": "FITS", b"\x01\xda": "SGI", b"Image type": "IM",
          b"\x00\x00\x01\x00": "ICO", b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WebP"}


def open_image(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Open image bytes as one of `formats` (header only: call .load() to decode, after checking its size).
    Raises BadInput("unsupported_format") for another known format, BadInput("too_large") past Pillow's pixel cap,
    BadInput("unreadable_image") otherwise."""
    try:
        return Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as e:  # Pillow's own cap on pixels
        raise BadInput("too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, or a damaged header of an accepted format
        kind = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
        accepted = ", ".join(formats)
        if kind and kind.upper() not in formats:
            raise BadInput("unsupported_format", f"a {kind} image; accepted: {accepted}") from None
        raise BadInput("unreadable_image", f"{type(e).__name__}: {e} (accepted: {accepted})") from None


def rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3) RGB. 16-bit and 32-bit grey values are scaled to 8 bits (a plain
    convert("RGB") clips them: a 16-bit photo would come out almost white); other modes convert as Pillow does."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = (a / 257 if a.max() > 255 else a).clip(0, 255).round().astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"))


def load_image(path: Path) -> Picture:
    """Read and fully decode an image file (IMAGE_FORMATS); raises BadInput(missing_file | unreadable_image |
    unsupported_format)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput("missing_file", f"{path} not found") from None
    except OSError as e:
        raise BadInput("unreadable_image", str(e)) from None
    img = open_image(raw)
    try:
        img.load()  # a truncated file only fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadInput("unreadable_image", f"{type(e).__name__}: {e}") from None
    return Picture(img, raw)


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a bool mask thresholded at 1/2: keeps areas and thin parts better than nearest."""
    if mask.shape == (h, w):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
    return np.asarray(img) >= 128


def encode_masks(masks: list[np.ndarray]) -> list[bytes]:
    """Bool (H, W) masks -> COCO compressed RLE counts (bytes)."""
    if not masks:
        return []
    stack = np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8))
    return [r["counts"] for r in mask_util.encode(stack)]


def make_row(id: str, picture: Picture, masks: list[tuple[np.ndarray, str]], category: str, source: str,
             opts: Options, result: Result) -> dict | None:
    """Validate masks against the image, resize, encode. masks: (bool (H, W), where it came from) per instance.

    Bad masks (other size, empty) go to `result.quarantine` one by one and the rest of the image is kept; an image
    left with no instance is quarantined as `no_instances` and None is returned, unless every mask it lost was
    below --min-area: a choice of the user, counted as skipped `below_min_area`, not quarantined.
    """
    h, w = picture.size
    kept = []
    for m, where in masks:
        if m.shape != (h, w):
            result.bad(id, where, "size_mismatch", f"mask {m.shape[0]}x{m.shape[1]}, image {h}x{w}", "instance")
        elif not m.any():
            result.bad(id, where, "empty_mask", "", "instance")
        elif m.sum() < opts.min_area:
            result.count("small_instance")
        else:
            kept.append((m, where))
    data, fmt, th, tw = picture.encoded(opts)
    final = []
    for m, where in kept:
        m = resize_mask(m, th, tw)
        if m.any():
            final.append(m)
        else:
            result.bad(id, where, "empty_mask", f"empty after resize to {th}x{tw}", "instance")
    if not final:
        if masks and not kept and len(masks) == sum(1 for m, _ in masks if m.shape == (h, w) and m.any()):
            result.count("below_min_area")  # every mask was valid and filtered by the user's --min-area
        else:
            result.bad(id, source, "no_instances", f"{len(masks)} mask(s) given, none usable")
        return None
    return {"id": str(id), "image": data, "format": fmt, "height": th, "width": tw,
            "masks": encode_masks(final), "areas": [int(m.sum()) for m in final],
            "category": category, "source": str(source)}
