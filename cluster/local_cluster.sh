#!/usr/bin/env bash
# Local multi-node Ray cluster on one machine (dev and tests): a thin wrapper around cluster/local_cluster.py.
#   bash cluster/local_cluster.sh start --workers 1 --cpus-per-node 2 --base-dir /tmp/rc [--port 6390] [--dashboard-port 8266]
#   bash cluster/local_cluster.sh status --base-dir /tmp/rc
#   bash cluster/local_cluster.sh stop --base-dir /tmp/rc
# Uses $PYTHON, else the repo's .venv/bin/python, else python3. See cluster/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
exec "$py" "$here/local_cluster.py" "$@"
