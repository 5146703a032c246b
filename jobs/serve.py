"""Serve a checkpoint over HTTP with Ray Serve: POST /translate, GET /healthz (instagan.distributed.serve has the
request format, the limits and the batching).

    python jobs/serve.py --checkpoint CKPT [--direction a2b] [--num-replicas 1] [--device cpu] [--max-batch 8]
    curl -s http://127.0.0.1:8000/healthz
    curl -s -X POST http://127.0.0.1:8000/translate -H 'Content-Type: application/json' -d @request.json
    curl -s http://127.0.0.1:8000/openapi.json        # the request/answer schema and status codes (browser: /docs)

    # requests without masks: the replica predicts them (a torchvision COCO Mask R-CNN file or a segmenter checkpoint)
    python jobs/serve.py --checkpoint CKPT --segmenter maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --category sheep
    curl -s -X POST http://127.0.0.1:8000/translate -d '{"image": "<base64 PNG>"}'   # + predicted_masks, scores

    # open to the network: an API key, read from an environment variable (never from the command line)
    export INSTAGAN_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python jobs/serve.py --checkpoint CKPT --host 0.0.0.0 --api-key-env INSTAGAN_API_KEY
    curl -s -X POST http://HOST:8000/translate -H "X-API-Key: $INSTAGAN_API_KEY" -d @request.json   # or
    curl -s -X POST http://HOST:8000/translate -H "Authorization: Bearer $INSTAGAN_API_KEY" -d @request.json

With --api-key-env NAME every POST /translate must carry the key (X-API-Key or Authorization: Bearer), else 401,
checked before the body is read; without it the server refuses to start on a --host that is not loopback (exit 2).
The key is sent in the clear over HTTP: put a TLS proxy in front of a server exposed beyond a trusted network.

Ray: --address (or RAY_ADDRESS) connects to a cluster, else a local Ray starts. Serve's HTTP proxy binds --host
(127.0.0.1 by default) and --port; the script blocks until Ctrl-C, then deletes the app (--detach leaves it running
on a cluster and exits). Send collections with jobs/serve_client.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from instagan import segment
from instagan.config import AMP
from instagan.distributed.serve import Limits, api_key_from_env, build_app, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (state.pt + config.json)")
    p.add_argument("--direction", default="a2b", choices=["a2b", "b2a"])
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda reserves one GPU per replica)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs reserved per replica")
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0: Ray's default)")
    p.add_argument("--max-batch", type=int, default=8, help="images per model call (dynamic batching)")
    p.add_argument("--batch-wait-s", type=float, default=0.02, help="longest wait for a batch to fill")
    p.add_argument("--ins-max", type=int, default=20, help="instances translated per image, largest first")
    p.add_argument("--ins-per", type=int, default=2, help="instances per sequential chunk")
    p.add_argument("--size", choices=("model", "native"), default="model",
                   help="model: resize to the training size and back (default); native: the input's own size")
    p.add_argument("--amp", choices=AMP, default="none", help="autocast dtype of the generator")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator in each replica")
    p.add_argument("--max-instances", type=int, default=Limits.max_instances)
    p.add_argument("--max-bytes", type=int, default=Limits.max_bytes)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="per image or mask")
    p.add_argument("--max-request-pixels", type=int, default=Limits.max_request_pixels,
                   help="image + all its masks, per request")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", metavar="NAME",
                   help="environment variable holding the API key POST /translate requires (X-API-Key: KEY or "
                        "Authorization: Bearer KEY); required when --host is not 127.0.0.1, ::1 or localhost")
    segment.add_arguments(p, "predicting the masks of requests that send none")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--detach", action="store_true", help="deploy and exit, leaving the app running (clusters)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = Limits(args.max_bytes, args.max_instances, args.max_pixels, args.max_request_pixels)
    try:
        api_key = api_key_from_env(args.api_key_env, args.host, os.environ)
        if args.category and not args.segmenter:
            raise ValueError("--category is for --segmenter")
        seg = None
        if args.segmenter:  # build_app loads it once before Serve starts: a bad file or category stops here
            seg = {"path": args.segmenter, "category": args.category, "score_threshold": args.score_threshold,
                   "min_area": args.min_instance_area}
        app = build_app(args.checkpoint, args.direction, args.num_replicas, args.device, args.max_batch,
                        args.batch_wait_s, args.ins_max, args.ins_per, None if args.size == "model" else 0, limits,
                        args.num_cpus, args.threads, args.amp, api_key, seg, compile=args.compile)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(app, args.host, args.port, args.address, args.detach,
               f" ({args.direction}, {args.num_replicas} replica(s), batch {args.max_batch}"
               f"{', API key required' if api_key else ''}"
               f"{f', masks predicted when missing ({args.segmenter})' if seg else ''})")


if __name__ == "__main__":
    sys.exit(main())
