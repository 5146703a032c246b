"""Send a collection through the Serve app (jobs/serve.py) with a bounded number of requests in flight, or time it.

    python jobs/serve_client.py --url http://127.0.0.1:8000 --input /tmp/shp2gir --split sample \
        --out /tmp/translated --concurrency 8
    python jobs/serve_client.py --url http://127.0.0.1:8000 --input ../shared/data/shp2gir_coco_sample \
        --bench 200 --concurrency 8                       # prints one JSON line: p50/p99 latency, images/s
    INSTAGAN_API_KEY=... python jobs/serve_client.py --url http://HOST:8000 --api-key-env INSTAGAN_API_KEY ...

--input: what jobs/translate.py reads, with its readers (a data_prep Parquet set, file or folder; an InstaGAN folder
<split>A/<id>.png + <split>A_seg/<id>_<k>.png; a COCO json with --images --a --b); the images of the source domain
of --direction (default: the direction the server translates, from its /healthz). Results go to
<out>/images/<id>.png and <out>/masks/<id>_<k>.png (mask k translates input mask k), one line per item in
<out>/results.jsonl (status and latency, or the error: HTTP status, or null for an input the readers rejected); a
failed item is reported and the rest go on. A server started with --segmenter (its /healthz says so) also gets the
images that have no masks (a plain image folder, a folder image without mask files, an unannotated COCO image), sent
without masks: it predicts them, and they are written to <out>/predicted_masks/<id>_<k>.png. At most --concurrency
requests are in flight: firing a whole collection at Serve at once collapses its throughput. Connection errors and
502-504 (503: Serve's back-pressure) are retried; other 4xx and 500 are not. --api-key-env NAME sends the key in
that environment variable (a server started with --api-key-env) as X-API-Key; a missing or wrong key is found
before the first item is sent (exit 2).

Bench mode (--bench N) sends N requests cycling over the input's items (bodies encoded once, beforehand) after
--warmup requests, writes nothing, and prints latency percentiles (client-side, per request) and images/s.
The work is done by instagan.client.
Exit code: 0 all ok, 1 some items failed, 2 unusable arguments or input, or no server answering /healthz.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_prep.rows import UsageError
from instagan.client import bench, check_server, read_items, translate_collection
from instagan.inputs import add_input_arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/serve_client.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve app's base URL")
    p.add_argument("--input", required=True, help="Parquet data set/file/folder, InstaGAN folder or COCO json")
    add_input_arguments(p, direction_default=None, direction_help="sends its source domain (default: the server's)")
    p.add_argument("--out", type=Path, help="output folder (translation mode)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time N requests instead of writing results")
    p.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the server's API key")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests before the bench (default: concurrency)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.concurrency < 1 or (not args.bench and args.out is None):
        print("error: --concurrency must be >= 1, and --out is needed unless --bench", file=sys.stderr)
        return 2
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        print("error: --api-key-env: that environment variable is not set, or empty (the option takes the variable's "
              "NAME, never the key itself)", file=sys.stderr)
        return 2
    try:
        health = check_server(args.url, api_key=api_key)
        served = health.get("direction")
        if args.direction and served and args.direction != served:
            print(f"[client] note: the server translates {served}; sending the source domain of {args.direction}",
                  file=sys.stderr)
        items = read_items(args.input, args.direction or served or "a2b", args.split, args.kind, args.images,
                           args.a, args.b, unmasked=bool(health.get("segmenter")))
        if args.bench:
            bodies = [b for _, b in items if isinstance(b, bytes)]
            if not bodies:
                raise UsageError(f"{args.input}: no readable item to send")
            result = bench(args.url, bodies, args.bench, args.concurrency, args.warmup, args.timeout, api_key)
            print(json.dumps(result))
            return 0 if result["failed"] == 0 else 1
        summary = translate_collection(args.url, items, args.out, args.concurrency, args.timeout, api_key)
    except (UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
