"""Start and stop a throwaway multi-node Ray cluster on ONE machine, for development and tests.

    python cluster/local_cluster.py start --workers 1 --cpus-per-node 2 --base-dir /tmp/rc \
        [--port 6390] [--dashboard-port 8266] [--object-store-mb 512] [--auth-mode disabled|token]
    python cluster/local_cluster.py status --base-dir /tmp/rc
    python cluster/local_cluster.py stop --base-dir /tmp/rc [--keep-logs]

(`bash cluster/local_cluster.sh ...` is the same with the repo's .venv python.) `start` prints KEY=VALUE lines on
stdout (progress goes to stderr), e.g.

    RAY_ADDRESS=127.0.0.1:6390                      # GCS address: ray.init(address=...) from this machine
    RAY_API_SERVER_ADDRESS=http://127.0.0.1:8266    # what `ray job submit` reads
    DASHBOARD=http://127.0.0.1:8266
    RAY_AUTH_MODE=disabled
    NODES=2

From Python: `from cluster.local_cluster import start, stop` (run from the repo root).

Every node is its own `ray start --block` process group with its own --temp-dir (nodes sharing one temp dir
delete each other's job working_dir). The cluster's pids, ports and temp dirs live in <base-dir>/cluster.json;
`stop` ends exactly those processes (and their children, found by a marker in their environment). It never calls
`ray stop`, which would end every Ray process on the machine. See cluster/README.md for the gotchas.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE_FILE = "cluster.json"
MARKER_ENV = "INSTAGAN_LOCAL_CLUSTER"  # set on every node; its children inherit it, so `stop` can find them
HOST = "127.0.0.1"
# AF_UNIX socket paths are limited to 107 bytes and Ray puts its sockets at
# <temp-dir>/session_<date>_<time>_<usec>_<pid>/sockets/dash_MetricsHead: keep <temp-dir> this short.
MAX_TEMP_DIR_LEN = 32


def _log(msg: str) -> None:
    print(f"[local_cluster] {msg}", file=sys.stderr, flush=True)


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


_CHILDREN: dict[int, subprocess.Popen] = {}  # nodes started by this process (polled, which also reaps them)


def _marker(base: Path) -> bytes:
    return f"{MARKER_ENV}={base}".encode()


def _is_ours(pid: int, base: Path) -> bool:
    """pid is alive and belongs to the cluster of base (checked by its environment, so a reused pid is not)."""
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    if not Path("/proc").is_dir():  # no /proc (macOS): trust the recorded pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        return _marker(base) in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's process
        return False


def _read_state(base_dir: Path) -> dict | None:
    path = base_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def http_get(url: str, token: str | None = None, timeout: float = 3.0) -> dict:
    """GET a dashboard JSON endpoint, e.g. f"{dashboard_url}/api/jobs/{submission_id}" -> {"status": ...}."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode() or "null")


def _token(state: dict) -> str | None:
    path = state.get("token_path")
    return Path(path).read_text().strip() if path else None


def alive_nodes(dashboard_url: str, token: str | None = None) -> int:
    """Number of ALIVE nodes, from the dashboard's state API (no Ray driver is started in this process)."""
    body = http_get(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=false", token)
    rows = body["data"]["result"]["result"]
    return sum(1 for row in rows if row.get("state") == "ALIVE")


def _node_env(base_dir: Path, auth_mode: str, token_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env["RAY_AUTH_MODE"] = auth_mode
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `ray start --block` drains for 30 s on SIGTERM by default (meant for Serve on Kubernetes); not for a dev box.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # A job's entrypoint (`python jobs/train.py`) is resolved with the node's PATH: make it this interpreter's.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env[MARKER_ENV] = str(base_dir)
    return env


def _node_temp_root(base_dir: Path) -> tuple[Path, Path | None]:
    """Where the nodes' --temp-dir folders go: <base_dir>/nodes, or a short /tmp/rlc-* folder (linked from there)."""
    nodes = base_dir / "nodes"
    if len(str(nodes / "w99")) <= MAX_TEMP_DIR_LEN:
        nodes.mkdir(exist_ok=True)
        return nodes, None
    short = Path(tempfile.mkdtemp(prefix="rlc-", dir="/tmp"))
    if nodes.is_symlink() or nodes.exists():
        nodes.unlink() if nodes.is_symlink() else shutil.rmtree(nodes)
    nodes.symlink_to(short, target_is_directory=True)
    return short, short


def _launch(name: str, args: list[str], temp_root: Path, base_dir: Path, env: dict) -> dict:
    temp_dir = temp_root / name
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = base_dir / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--temp-dir", str(temp_dir)] + args
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=str(base_dir), start_new_session=True,  # own session: a Ctrl-C in the launching shell does not reach it
        )
    _CHILDREN[proc.pid] = proc
    return {"name": name, "pid": proc.pid, "temp_dir": str(temp_dir), "log": str(log_path), "cmd": cmd}


def _tail(path: str, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_nodes(state: dict, want: int, timeout: float) -> None:
    token = _token(state)
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        for node in state["nodes"]:
            if not _is_ours(node["pid"], Path(state["base_dir"])):
                raise RuntimeError(f"node {node['name']} exited during start-up; its log:\n{_tail(node['log'])}")
        try:
            if alive_nodes(state["dashboard_url"], token) >= want:
                # the job API answers too (the submission path tests use)
                http_get(f"{state['dashboard_url']}/api/jobs/", token)
                return
        except (OSError, urllib.error.URLError, KeyError, ValueError) as err:
            last_err = err
        time.sleep(0.5)
    raise TimeoutError(f"{want} alive nodes not reached within {timeout:.0f} s (last error: {last_err})")


def start(
    base_dir: str | os.PathLike,
    workers: int = 1,
    cpus_per_node: int = 2,
    port: int | None = None,
    dashboard_port: int | None = None,
    object_store_mb: int | None = None,
    gpus_per_node: int = 0,
    auth_mode: str = "disabled",
    timeout: float = 60.0,
) -> dict:
    """Start a head plus `workers` worker nodes; return the state saved in <base_dir>/cluster.json.

    Keys: address (GCS "127.0.0.1:P"), dashboard_url ("http://127.0.0.1:D", also the job-submission address),
    auth_mode, token_path (token mode only), env (variables a client needs), nodes (name, pid, temp_dir, log).
    Ports left as None are picked free. GPUs default to 0 per node: every node on one machine would otherwise
    detect (and promise) all of the machine's GPUs.
    """
    if auth_mode not in ("disabled", "token"):
        raise ValueError("auth_mode must be 'disabled' or 'token'")
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    old = _read_state(base)
    if old and any(_is_ours(n["pid"], base) for n in old["nodes"]):
        raise RuntimeError(f"a cluster from {base} is still running; stop it first")
    (base / "logs").mkdir(exist_ok=True)

    token_path = None
    if auth_mode == "token":
        token_path = base / "auth_token"
        if not token_path.exists():
            token_path.write_text(secrets.token_hex(32))  # same format as `ray get-auth-token --generate`
            token_path.chmod(0o600)

    taken = {p for p in (port, dashboard_port) if p}
    for p in taken:
        if not _port_free(p):
            raise RuntimeError(f"port {p} is in use on {HOST}; pick another (or leave it out for a free one)")
    port = port or _free_port(taken)
    dashboard_port = dashboard_port or _free_port(taken)
    temp_root, short_root = _node_temp_root(base)
    env = _node_env(base, auth_mode, token_path)
    common = [
        "--num-cpus", str(cpus_per_node), "--num-gpus", str(gpus_per_node),
        "--min-worker-port", "0", "--max-worker-port", "0",  # default 10002-19999 is one range for all nodes
        "--disable-usage-stats",
    ]
    if object_store_mb:
        common += ["--object-store-memory", str(object_store_mb * 1024 * 1024)]

    state = {
        "base_dir": str(base),
        "address": f"{HOST}:{port}",
        "dashboard_url": f"http://{HOST}:{dashboard_port}",
        "auth_mode": auth_mode,
        "token_path": str(token_path) if token_path else None,
        "short_temp_root": str(short_root) if short_root else None,
        "nodes": [],
    }
    state["env"] = client_env(state)

    def save() -> None:
        (base / STATE_FILE).write_text(json.dumps(state, indent=2))

    try:
        head_args = [
            "--head", "--port", str(port),
            "--dashboard-host", HOST,  # never expose the dashboard (it runs arbitrary jobs) beyond this machine
            "--dashboard-port", str(dashboard_port),
            "--ray-client-server-port", str(_free_port(taken)),
            "--dashboard-agent-listen-port", str(_free_port(taken)),  # default 52365 would clash between nodes
        ]
        state["nodes"].append(_launch("head", head_args + common, temp_root, base, env))
        save()
        _log(f"head starting (GCS {state['address']}, dashboard {state['dashboard_url']})")
        _wait_nodes(state, 1, timeout)
        for i in range(1, workers + 1):
            worker_args = [
                "--address", state["address"],
                "--dashboard-agent-listen-port", str(_free_port(taken)),
            ]
            state["nodes"].append(_launch(f"w{i}", worker_args + common, temp_root, base, env))
        save()
        _log(f"{workers} worker node(s) starting")
        _wait_nodes(state, workers + 1, timeout)
    except BaseException:
        _log(f"start failed; stopping what was started (logs kept in {base / 'logs'} and {temp_root})")
        stop(base, keep_logs=True)
        raise
    _log(f"cluster up: {workers + 1} nodes alive")
    return state


def client_env(state: dict) -> dict[str, str]:
    """Environment variables a client (ray job submit, ray.init) on this machine needs for this cluster."""
    env = {
        "RAY_ADDRESS": state["address"],
        "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
        "DASHBOARD": state["dashboard_url"],
        "RAY_AUTH_MODE": state["auth_mode"],
    }
    if state.get("token_path"):
        env["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
    return env


def status(base_dir: str | os.PathLike) -> dict:
    """State of the cluster in base_dir: {"running": bool, "alive_nodes": int | None, ...cluster.json}."""
    base = Path(base_dir).resolve()
    state = _read_state(base)
    if state is None:
        return {"running": False, "alive_nodes": None, "nodes": []}
    for node in state["nodes"]:
        node["process_alive"] = _is_ours(node["pid"], base)
    try:
        state["alive_nodes"] = alive_nodes(state["dashboard_url"], _token(state))
    except (OSError, urllib.error.URLError, KeyError, ValueError):
        state["alive_nodes"] = None
    state["running"] = any(n["process_alive"] for n in state["nodes"])
    return state


def leftover_pids(base_dir: str | os.PathLike) -> list[int]:
    """Processes carrying this cluster's marker in their environment (Ray workers, job drivers, agents)."""
    base = Path(base_dir).resolve()
    if not Path("/proc").is_dir():
        return []
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and int(e.name) != os.getpid() and _is_ours(int(e.name), base)]


def _wait_gone(pids: list[int], base: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _is_ours(p, base)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(base_dir: str | os.PathLike, keep_logs: bool = False, timeout: float = 20.0) -> None:
    """Stop every node started from base_dir (workers first, then the head) and everything they spawned."""
    base = Path(base_dir).resolve()
    state = _read_state(base)
    if state is None:
        _log(f"no cluster state in {base}; nothing to stop")
        return
    nodes = state["nodes"]
    for group in ([n for n in nodes if n["name"] != "head"], [n for n in nodes if n["name"] == "head"]):
        for node in group:
            if _is_ours(node["pid"], base):
                os.kill(node["pid"], signal.SIGTERM)  # `ray start --block` ends its own node's processes
        for pid in _wait_gone([n["pid"] for n in group], base, timeout):
            _log(f"node pid {pid} ignored SIGTERM for {timeout:.0f} s; killing it")
            _kill(pid)
    # Stragglers (a job driver, a worker mid-start): every process of the cluster carries its marker variable.
    # The dashboard's multiprocessing helpers outlive the head's `ray start` by about a second: give them 3 s.
    strays = _wait_gone(leftover_pids(base), base, 3.0)
    for pid in strays:
        _kill(pid)
    if strays:
        _log(f"killed {len(strays)} leftover process(es)")
    _wait_gone(strays, base, 5.0)
    (base / STATE_FILE).unlink(missing_ok=True)
    if not keep_logs:
        for node in nodes:
            shutil.rmtree(node["temp_dir"], ignore_errors=True)
        if state.get("short_temp_root"):
            shutil.rmtree(state["short_temp_root"], ignore_errors=True)
            if (base / "nodes").is_symlink():
                (base / "nodes").unlink()
    _log(f"stopped {len(nodes)} node(s) from {base}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a head and N worker nodes, wait until all are alive")
    p_start.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    p_start.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of every node")
    p_start.add_argument("--gpus-per-node", type=int, default=0, help="logical GPUs of every node")
    p_start.add_argument("--port", type=int, default=None, help="GCS port of the head (default: a free one)")
    p_start.add_argument("--dashboard-port", type=int, default=None, help="dashboard/job API port (default: free)")
    p_start.add_argument("--object-store-mb", type=int, default=None, help="object store per node (default: Ray's)")
    p_start.add_argument("--auth-mode", choices=["disabled", "token"], default="disabled",
                         help="token: generate <base-dir>/auth_token; clients need RAY_AUTH_MODE=token + the token")
    p_start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the nodes")
    for p in (p_start, sub.add_parser("status", help="show nodes and liveness"),
              sub.add_parser("stop", help="stop every node this base dir started")):
        p.add_argument("--base-dir", required=True, help="folder holding cluster.json, logs and node temp dirs")
    sub.choices["stop"].add_argument("--keep-logs", action="store_true", help="keep the nodes' temp dirs and logs")
    args = parser.parse_args(argv)

    if args.command == "start":
        try:
            state = start(args.base_dir, workers=args.workers, cpus_per_node=args.cpus_per_node, port=args.port,
                          dashboard_port=args.dashboard_port, object_store_mb=args.object_store_mb,
                          gpus_per_node=args.gpus_per_node, auth_mode=args.auth_mode, timeout=args.timeout)
        except (RuntimeError, TimeoutError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for key, value in state["env"].items():
            print(f"{key}={value}")
        print(f"NODES={len(state['nodes'])}")
        print(f"BASE_DIR={state['base_dir']}")
    elif args.command == "status":
        state = status(args.base_dir)
        if not state["nodes"]:
            print("RUNNING=0")
            return 1
        print(f"RUNNING={int(state['running'])}")
        print(f"ALIVE_NODES={state['alive_nodes']}")
        for key, value in state["env"].items():
            print(f"{key}={value}")
        for node in state["nodes"]:
            print(f"NODE {node['name']} pid={node['pid']} alive={node['process_alive']} temp_dir={node['temp_dir']}")
        return 0 if state["running"] else 1
    else:
        stop(args.base_dir, keep_logs=args.keep_logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
