#!/usr/bin/env bash
# fs-tests/metrics.sh: `tessera serve --metrics` for Prometheus.
#
# Protects: the metrics endpoint answers on loopback while the datastore is served over NFS
# and FUSE; the text passes `promtool check metrics` (Debian's prometheus package) and
# parses as OpenMetrics when asked; request counters, latency histograms and byte counters
# move for each front end after I/O through it, and so do the space, cache, dedup and write
# figures; another path answers 404; a busy port is a one-line error; the shipped Grafana
# dashboard, its queries evaluated by a real Prometheus scraping the server, shows data in
# every panel (packaging/render-dashboard.py draws it: Grafana is not in the registries).
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v curl >/dev/null || fail "curl is required"
make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
PORT=${METRICS_PORT:-19477}
URL=http://127.0.0.1:$PORT/metrics

tessera init "$DS" >/dev/null || fail "tessera init failed"
start_serve "$DS" --mount "$MNT" --metrics "127.0.0.1:$PORT"

# Prometheus (Debian's prometheus package) scrapes the server every second from the start.
PROM_PORT=${PROM_PORT:-19090}
PROM=http://127.0.0.1:$PROM_PORT
if command -v prometheus >/dev/null; then
    cat >"$TEST_TMP/prom.yml" <<EOF
global: { scrape_interval: 1s }
scrape_configs:
  - job_name: tessera
    static_configs: [ { targets: ['127.0.0.1:$PORT'] } ]
EOF
    prometheus --config.file="$TEST_TMP/prom.yml" --storage.tsdb.path="$TEST_TMP/prom" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$TEST_TMP/prom.log" 2>&1 &
    BG_PIDS+=("$!")
    # Its first scrape comes before the I/O below, so the rates see all of it.
    for _ in $(seq 60); do
        tmo curl -sf "http://127.0.0.1:$PROM_PORT/api/v1/query?query=up" | grep -q '"1"\]' && break
        sleep 0.5
    done
elif [ "${CI:-}" = true ]; then
    fail "prometheus not found (apt-get install prometheus; .ci/deps.sh installs it)"
fi

scrape() { tmo curl -sf "$@" "$URL"; }
# value NAME_WITH_LABELS: the sample's value in the last scrape (0 if absent)
value() { awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }' "$TEST_TMP/m.txt"; }

step "the endpoint answers, and promtool accepts what it says"
scrape >"$TEST_TMP/m0.txt" || fail "no answer on $URL"
if command -v promtool >/dev/null; then
    promtool check metrics <"$TEST_TMP/m0.txt" >"$TEST_TMP/promtool.txt" 2>&1 ||
        fail "promtool check metrics: $(cat "$TEST_TMP/promtool.txt")"
elif [ "${CI:-}" = true ]; then
    fail "promtool not found (apt-get install prometheus; .ci/deps.sh installs it)"
else
    log "promtool not found: format not checked (apt-get install prometheus)"
fi
code=$(tmo curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/other")
[ "$code" = 404 ] || fail "GET /other answered $code, not 404"

step "I/O through FUSE and NFS moves each front end's counters"
tmo dd if=/dev/urandom of="$TEST_TMP/src.bin" bs=1M count=8 status=none
tmo cp "$TEST_TMP/src.bin" "$MNT/a.bin"
tmo cp "$TEST_TMP/src.bin" "$MNT/b.bin"   # the same content again: deduplicated
sync "$MNT/a.bin" "$MNT/b.bin"
[ "$(sha "$MNT/a.bin")" = "$(sha "$TEST_TMP/src.bin")" ] || fail "a.bin differs"
tmo qemu-img convert -O raw "$TEST_TMP/src.bin" "nfs://$NFS_HOST/ds/c.bin" || fail "NFS write (qemu-img) failed"
tmo qemu-img convert -O raw "nfs://$NFS_HOST/ds/c.bin" "$TEST_TMP/c.bin" || fail "NFS read (qemu-img) failed"
cmp -s "$TEST_TMP/c.bin" "$TEST_TMP/src.bin" || fail "NFS read back other bytes"
tessera warm "$MNT/a.bin" >/dev/null || fail "tessera warm failed"
sleep 1.2 # scrapes within a second share one reading
scrape >"$TEST_TMP/m.txt" || fail "no answer on $URL"
for k in 'tessera_requests_total{frontend="Fuse",op="write"}' \
    'tessera_requests_total{frontend="Nfs",op="write"}' \
    'tessera_requests_total{frontend="Nfs",op="read"}' \
    'tessera_request_duration_seconds_count{frontend="Fuse",op="write"}' \
    'tessera_request_duration_seconds_count{frontend="Nfs",op="write"}' \
    tessera_files tessera_stored_bytes tessera_logical_bytes tessera_chunks_written_total \
    tessera_dedup_hits_total tessera_cache_misses_total tessera_cache_bytes \
    'tessera_stage_calls_total{stage="write"}' tessera_disk_total_bytes; do
    v=$(value "$k")
    awk -v v="$v" 'BEGIN { exit !(v > 0) }' || fail "$k is $v after I/O: $(grep -F "${k%%\{*}" "$TEST_TMP/m.txt" | head -5)"
done
for k in 'tessera_io_bytes_total{frontend="Fuse",direction="Write"}' 'tessera_io_bytes_total{frontend="Nfs",direction="Write"}'; do
    v=$(value "$k")
    awk -v v="$v" 'BEGIN { exit !(v >= 8388608) }' || fail "$k is $v after writing 8 MiB"
done
[ "$(value tessera_files)" = 3 ] || fail "tessera_files is $(value tessera_files), not 3"
log "fuse writes $(value 'tessera_requests_total{frontend="Fuse",op="write"}'), nfs writes $(value 'tessera_requests_total{frontend="Nfs",op="write"}'), dedup hits $(value tessera_dedup_hits_total)"

step "every metric the shipped Grafana dashboard queries is exposed"
python3 - "$FS_TESTS_DIR/../packaging/grafana-dashboard.json" "$TEST_TMP/m.txt" <<'PY' || fail "the dashboard queries metrics the server does not expose"
import json, re, sys
d = json.load(open(sys.argv[1]))
have = {l.split("{")[0].split()[0] for l in open(sys.argv[2]) if l.strip() and not l.startswith("#")}
used = {m for p in d["panels"] for t in p["targets"] for m in re.findall(r"tessera_[a-z_]+", t["expr"])}
missing = sorted(used - have)
print("dashboard metrics:", len(used), "missing:", missing, file=sys.stderr)
sys.exit(1 if missing or not used else 0)
PY

step "the Grafana dashboard, rendered from Prometheus, shows data in every panel"
# What the reclamation, scrub and error panels show.
rm "$MNT/b.bin"
tessera gc "$DS" >/dev/null || fail "tessera gc failed"
tessera scrub "$DS" >/dev/null || fail "tessera scrub failed"
cat "$MNT/no-such-file" 2>/dev/null && fail "reading a missing file succeeded"
# Reads of the warmed file over NFS: cache hits.
tmo qemu-img convert -O raw "nfs://$NFS_HOST/ds/a.bin" "$TEST_TMP/a2.bin" || fail "NFS read (qemu-img) failed"
PY=python3
python3 -c 'import matplotlib' 2>/dev/null || PY=/usr/bin/python3
if command -v prometheus >/dev/null && "$PY" -c 'import matplotlib' 2>/dev/null; then
    for _ in $(seq 50); do
        n=$(tmo curl -sf "$PROM/api/v1/query?query=count_over_time(tessera_files%5B1m%5D)" |
            python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0)
        [ "${n%.*}" -ge 5 ] 2>/dev/null && break
        sleep 0.5
    done
    sleep 2 # the last scrapes after gc and scrub
    tmo "$PY" "$FS_TESTS_DIR/../packaging/render-dashboard.py" \
        --dashboard "$FS_TESTS_DIR/../packaging/grafana-dashboard.json" --prometheus "$PROM" \
        --minutes 2 --out "$TEST_TMP/dashboard.png" 2>"$TEST_TMP/render.txt" ||
        fail "dashboard: $(tail -n 3 "$TEST_TMP/render.txt")"
    [ -z "${DASHBOARD_PNG:-}" ] || cp "$TEST_TMP/dashboard.png" "$DASHBOARD_PNG"
    log "$(tr '\n' ';' <"$TEST_TMP/render.txt")"
elif [ "${CI:-}" = true ]; then
    fail "prometheus or matplotlib missing (apt-get install prometheus python3-matplotlib)"
else
    log "prometheus or matplotlib missing: dashboard not rendered"
fi

step "OpenMetrics when the scraper asks for it"
scrape -H 'Accept: application/openmetrics-text; version=1.0.0' >"$TEST_TMP/om.txt" || fail "no OpenMetrics answer"
tail -n 1 "$TEST_TMP/om.txt" | grep -qx '# EOF' || fail "OpenMetrics answer does not end with # EOF"

stop_serve

step "a port in use is a one-line error"
python3 -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); time.sleep(30)' "$PORT" &
HOLDER=$!
BG_PIDS+=("$HOLDER")
sleep 0.5
mkdir -p "$TEST_TMP/mnt2"
expect_error 'cannot serve metrics on' tessera mount "$DS" "$TEST_TMP/mnt2" --metrics "127.0.0.1:$PORT"
is_mounted "$TEST_TMP/mnt2" && fail "a mount that could not serve metrics stayed mounted"
kill "$HOLDER" 2>/dev/null || true
tessera fsck "$DS" >/dev/null || fail "fsck after the refused start"
log "ok"
