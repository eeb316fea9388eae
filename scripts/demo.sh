#!/usr/bin/env bash
# make demo: build a small image locally, serve it on loopback, apply examples/
# in local mode, and show each disk's status and libvirt XML.
set -euo pipefail
cd "$(dirname "$0")/.."
VMDISK=.venv/bin/vmdisk
STATE=demo-state
PORT=18080

rm -rf "$STATE"
mkdir -p "$STATE/www"
echo "== building the demo image"
.venv/bin/python scripts/demo_image.py "$STATE/www/demo-disk.raw"

.venv/bin/python -m http.server "$PORT" --bind 127.0.0.1 --directory "$STATE/www" \
  >"$STATE/http.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && break
  sleep 0.1
done

echo "== vmdisk apply -f examples/"
status=0
# The demo image server is on loopback, which the image-source policy refuses
# unless the node names it explicitly.
VMDISK_IMAGE_HOSTS=127.0.0.1/32 $VMDISK apply -f examples/ --state-dir "$STATE/var" -v || status=$?

echo
echo "== status and libvirt XML"
$VMDISK get vmdisks --state-dir "$STATE/var" -o yaml |
  .venv/bin/python scripts/show_status.py
$VMDISK get disksnapshots --state-dir "$STATE/var"

echo
echo "== image cache"
$VMDISK cache list --state-dir "$STATE/var"
echo
echo "downloads served: $(grep -c 'GET /demo-disk.raw' "$STATE/http.log") (one per node, whatever the number of disks)"
exit $status
