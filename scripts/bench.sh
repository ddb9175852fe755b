#!/usr/bin/env bash
# Benchmarks embedgate against same-run baselines on 127.0.0.1 and prints
# ratios (see scripts/BENCH.md):
#   hit  : gateway cache hit (auth + rate + quota + metering) vs nginx proxy_cache hit
#   miss : gateway miss (unique bodies) vs calling the fake upstream directly
#          (under load, and at one connection for the unloaded added latency)
# Runs alternate A/B/A/B; nothing is asserted. Every process it starts is
# stopped on exit.
#
# Env: BENCH_SECONDS (10) per run, BENCH_LAT_SECONDS (BENCH_SECONDS/2) per
# one-connection run, BENCH_CONNECTIONS (32), BENCH_THREADS (2), BENCH_ROUNDS
# (2), BENCH_REDIS (auto: also a gateway on Redis if redis-server is
# installed; 0: never; 1: required), BENCH_BUILD (1; 0 uses the existing
# target/release/embedgate and target/release/fake-dashscope), BENCH_KEEP (0;
# 1 keeps the work dir), BENCH_OUT (target/bench-latest.txt: the table).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=${BENCH_SECONDS:-10}
LAT_SECS=${BENCH_LAT_SECONDS:-$(( SECS / 2 > 0 ? SECS / 2 : 1 ))}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
ROUNDS=${BENCH_ROUNDS:-2}
USE_REDIS=${BENCH_REDIS:-auto}
BUILD=${BENCH_BUILD:-1}
BIN=$ROOT/target/release/embedgate
FAKE_BIN=$ROOT/target/release/fake-dashscope
API_PATH=/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding
BODY='{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"The quick brown fox jumps over the lazy dog","factor":1}]},"parameters":{"auto_truncation":true}}'
KEY=bench-key

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then
  [ "$(id -u)" -eq 0 ] || die "please install: ${need[*]}"
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
case $USE_REDIS in
  auto) if command -v redis-server >/dev/null 2>&1; then USE_REDIS=1; else USE_REDIS=0; fi ;;
  1) command -v redis-server >/dev/null 2>&1 || die "BENCH_REDIS=1 but redis-server is not installed" ;;
  *) USE_REDIS=0 ;;
esac

if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p embedgate -p fake-dashscope (waits for the cargo lock if others are building)"
  cargo build --release -p embedgate -p fake-dashscope >&2
fi
[ -x "$BIN" ] || die "$BIN not found"
[ -x "$FAKE_BIN" ] || die "$FAKE_BIN not found"

# ---------------------------------------------------------------- processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/embedgate-bench.XXXXXX")
chmod 755 "$WORK"
PIDS=()

stop_pid() { # TERM, up to 5 s, then KILL; the pid's children too (nginx workers)
  local pid=$1 kids i
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_line FILE SED_EXPR PID: prints the first match of SED_EXPR in FILE (10 s)
wait_line() {
  local file=$1 expr=$2 pid=$3 i v
  for ((i = 0; i < 100; i++)); do
    v=$(sed -n "$expr" "$file" 2>/dev/null | head -n1)
    if [ -n "$v" ]; then printf '%s\n' "$v"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $(( 20000 + RANDOM % 40000 ))
}

# cpu_ticks PID...: user+system clock ticks of the pids and their children threads
cpu_ticks() {
  local t=0 p v
  for p in "$@"; do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
    t=$(( t + ${v:-0} ))
  done
  echo "$t"
}
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# fake upstream, latency 0 so the gateway's own overhead shows
"$FAKE_BIN" --listen 127.0.0.1:0 --latency-ms 0 >"$WORK/fake.out" 2>"$WORK/fake.err" &
FAKE_PID=$!; PIDS+=("$FAKE_PID")
FAKE=$(wait_line "$WORK/fake.out" 's/^fake-dashscope listening on //p' "$FAKE_PID") \
  || die "fake upstream did not start: $(cat "$WORK/fake.err")"
log "fake upstream $FAKE"

DIGEST=$(printf %s "$KEY" | "$BIN" hash-key)

start_gateway() { # NAME REDIS_LINE [LIMITS=1] [JOURNAL=true] [LOG=warn] -> sets GW_URL, GW_PID
  local name=$1 redis_line=$2 limits=${3:-1} journal=${4:-true} loglevel=${5:-warn} drop='^$^'
  [ "$limits" = 1 ] || drop='^(rate|quota) = '
  sed -e "s|@UPSTREAM@|$FAKE|" -e "s|@KEY_SHA256@|$DIGEST|" -e "s|@REDIS_LINE@|$redis_line|" \
    -e "s|@JOURNAL@|$journal|" -e "s|@DATA@|$WORK/$name.data|" \
    "$ROOT/scripts/bench/gateway.toml.tmpl" | grep -Ev "$drop" >"$WORK/$name.toml"
  "$BIN" check-config "$WORK/$name.toml" >/dev/null || die "bad generated config $WORK/$name.toml"
  BENCH_UPSTREAM_KEY=bench-upstream-key EMBEDGATE_LOG=$loglevel \
    "$BIN" --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  GW_PID=$!; PIDS+=("$GW_PID")
  GW_URL=$(wait_line "$WORK/$name.out" '1s/^embedgate listening on //p' "$GW_PID") \
    || die "gateway $name did not start: $(cat "$WORK/$name.err")"
  log "gateway $name $GW_URL"
}

start_gateway gw ""
GW=$GW_URL; GW_PID_MEM=$GW_PID
# The same gateway with a tenant without rate and quota: the cost of the
# limit checks on the hit path.
start_gateway gwn "" 0
GWN=$GW_URL; GW_PID_NOLIM=$GW_PID
# The same gateway with ledger.journal = false: the cost of appending every
# metered answer to the journal (one write(2) per answer, fsync in the
# background) on the hit path.
start_gateway gwj "" 1 false
GWJ=$GW_URL; GW_PID_NOJOURNAL=$GW_PID
# Production settings: the access log on (its default level, to a file),
# limits and the journal.
start_gateway gwl "" 1 true info
GWL=$GW_URL; GW_PID_LOG=$GW_PID

if [ "$USE_REDIS" = 1 ]; then
  mkdir -p "$WORK/redis"
  started=0
  for _ in 1 2 3 4 5; do
    RPORT=$(free_port)
    redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$WORK/redis" --daemonize no >"$WORK/redis.log" 2>&1 &
    RPID=$!
    for ((i = 0; i < 50; i++)); do
      if redis-cli -p "$RPORT" ping 2>/dev/null | grep -q PONG; then started=1; break; fi
      kill -0 "$RPID" 2>/dev/null || break
      sleep 0.1
    done
    if [ $started = 1 ]; then PIDS+=("$RPID"); break; fi
    stop_pid "$RPID"
  done
  [ $started = 1 ] || die "redis-server did not start: $(tail -n5 "$WORK/redis.log")"
  log "redis 127.0.0.1:$RPORT"
  start_gateway gwr "redis_url = \"redis://127.0.0.1:$RPORT\""
  GWR=$GW_URL; GW_PID_REDIS=$GW_PID
fi

# nginx, own prefix, proxy_cache in front of the fake
mkdir -p "$WORK/nginx"
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root;"
started=0
for _ in 1 2 3 4 5; do
  NPORT=$(free_port)
  NPORT2=$(free_port)
  sed -e "s|@DIR@|$WORK/nginx|g" -e "s|@PORT@|$NPORT|" -e "s|@PORT2@|$NPORT2|" -e "s|@USER_LINE@|$USER_LINE|" \
    -e "s|@UPSTREAM_HOSTPORT@|${FAKE#http://}|" \
    "$ROOT/scripts/bench/nginx.conf.tmpl" >"$WORK/nginx/nginx.conf"
  "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
    >"$WORK/nginx/stdout" 2>&1 &
  NGINX_PID=$!
  for ((i = 0; i < 50; i++)); do
    if curl -s -o /dev/null "http://127.0.0.1:$NPORT/" 2>/dev/null; then started=1; break; fi
    kill -0 "$NGINX_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ $started = 1 ]; then PIDS+=("$NGINX_PID"); break; fi
  stop_pid "$NGINX_PID"
done
[ $started = 1 ] || die "nginx did not start: $(tail -n5 "$WORK/nginx/error.log" "$WORK/nginx/stdout" 2>/dev/null)"
NG=http://127.0.0.1:$NPORT
NGP=http://127.0.0.1:$NPORT2   # access log + gzip
NGINX_PIDS=("$NGINX_PID" $(ps -o pid= --ppid "$NGINX_PID"))
log "nginx $NG: $(ps -o args= --ppid "$NGINX_PID" | sort | uniq -c | tr -s ' ' | paste -sd, -)"

# ---------------------------------------------------------------- checks
post() { # URL HEADER... -> response headers on stdout
  local url=$1; shift
  curl -sS -m 10 -o /dev/null -D - "$url$API_PATH" -H 'Content-Type: application/json' "$@" -d "$BODY"
}
warm_hit() { # URL HEADER_NAME AUTH...: repeats until the answer says HIT
  local url=$1 hname=$2 i; shift 2
  for ((i = 0; i < 5; i++)); do
    if post "$url" "$@" | tr -d '\r' | grep -qi "^$hname: HIT"; then return 0; fi
  done
  die "$url never answered $hname: HIT"
}
AUTH="Bearer $KEY"
warm_hit "$GW" x-cache -H "Authorization: $AUTH"
warm_hit "$GWN" x-cache -H "Authorization: $AUTH"
warm_hit "$GWJ" x-cache -H "Authorization: $AUTH"
[ "$USE_REDIS" = 1 ] && warm_hit "$GWR" x-cache -H "Authorization: $AUTH"
warm_hit "$NG" x-cache-status -H "Authorization: $AUTH"
RESP_BYTES=$(curl -sS -m 10 "$GW$API_PATH" -H "Authorization: $AUTH" -H 'Content-Type: application/json' -d "$BODY" | wc -c)

# counters from the gateway's /metrics: "hit nonhit upstream_responses"
gw_counts() {
  curl -sS -m 10 "$1/metrics" | awk '
    /^embedgate_requests_total\{/ { if ($0 ~ /cache="hit"/) h += $NF; else n += $NF }
    /^embedgate_upstream_responses_total\{/ { u += $NF }
    END { printf "%d %d %d\n", h, n, u }'
}

# ---------------------------------------------------------------- runs
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# run LABEL ROUND URL SCRIPT CONNS THREADS SECS AUTH CPU_PIDS...
run() {
  local label=$1 round=$2 url=$3 script=$4 c=$5 t=$6 s=$7 auth=$8; shift 8
  local before after out line
  before=$(cpu_ticks "$@")
  out=$(BENCH_BODY=$BODY BENCH_AUTH=$auth BENCH_PATH=$API_PATH \
    BENCH_ACCEPT_ENCODING=${AE:-} BENCH_BATCH_MODE=${BATCH_MODE:-hit} \
    BENCH_NONCE="b$$-$label-r$round-$RANDOM" \
    timeout -k 5 $(( s + 30 )) wrk -t "$t" -c "$c" -d "${s}s" --timeout 5s \
    -s "$ROOT/scripts/bench/$script" "$url") || die "wrk failed for $label: $out"
  after=$(cpu_ticks "$@")
  line=$(printf '%s\n' "$out" | sed -n 's/^BENCH //p')
  [ -n "$line" ] || die "no result from wrk for $label: $out"
  printf '%s\t%s\t%s cpu_ticks=%d\n' "$label" "$round" "$line" $(( after - before )) >>"$RESULTS"
  log "$label round $round: $line cpu_ticks=$(( after - before ))"
}

FAKE_P=("$FAKE_PID")
GW_P=("$GW_PID_MEM")
[ "$USE_REDIS" = 1 ] && GWR_P=("$GW_PID_REDIS" "$RPID")  # CPU: the gateway and its Redis

log "hit path: ${ROUNDS} rounds x ${SECS}s, wrk -t$THREADS -c$CONNS"
hit_before=$(gw_counts "$GW")
[ "$USE_REDIS" = 1 ] && hitr_before=$(gw_counts "$GWR")
for ((r = 1; r <= ROUNDS; r++)); do
  warm_hit "$GW" x-cache -H "Authorization: $AUTH"
  run hit_gw "$r" "$GW" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}"
  warm_hit "$NG" x-cache-status
  run hit_nginx "$r" "$NG" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${NGINX_PIDS[@]}"
  warm_hit "$GWN" x-cache -H "Authorization: $AUTH"
  run hit_gwn "$r" "$GWN" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "$GW_PID_NOLIM"
  warm_hit "$GWJ" x-cache -H "Authorization: $AUTH"
  run hit_gwj "$r" "$GWJ" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "$GW_PID_NOJOURNAL"
  if [ "$USE_REDIS" = 1 ]; then
    warm_hit "$GWR" x-cache -H "Authorization: $AUTH"
    run hit_gwr "$r" "$GWR" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWR_P[@]}"
  fi
done
warm_hit "$NG" x-cache-status
hit_after=$(gw_counts "$GW")
HIT_CHECK=$(awk -v a="$hit_before" -v b="$hit_after" 'BEGIN {
  split(a, x, " "); split(b, y, " ");
  printf "%d hits, %d non-hits, %d upstream calls", y[1]-x[1], y[2]-x[2], y[3]-x[3] }')
if [ "$USE_REDIS" = 1 ]; then
  hitr_after=$(gw_counts "$GWR")
  HITR_CHECK=$(awk -v a="$hitr_before" -v b="$hitr_after" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    printf "%d hits, %d non-hits, %d upstream calls", y[1]-x[1], y[2]-x[2], y[3]-x[3] }')
fi

log "production settings: access log on, gzip, ${ROUNDS} rounds x ${SECS}s"
for ((r = 1; r <= ROUNDS; r++)); do
  warm_hit "$GWL" x-cache -H "Authorization: $AUTH"
  run hitlog_gw "$r" "$GWL" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "$GW_PID_LOG"
  warm_hit "$NGP" x-cache-status
  run hitlog_nginx "$r" "$NGP" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${NGINX_PIDS[@]}"
  AE=gzip run hitgz_gw "$r" "$GWL" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "$GW_PID_LOG"
  AE=gzip run hitgz_nginx "$r" "$NGP" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${NGINX_PIDS[@]}"
done

log "text-embedding-v4 10-text batches: all hits, 5/10 hits, all misses"
for ((r = 1; r <= ROUNDS; r++)); do
  BATCH_MODE=hit run batch_hit "$r" "$GW" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}"
  BATCH_MODE=half run batch_half "$r" "$GW" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" "${FAKE_P[@]}"
  BATCH_MODE=miss run batch_miss "$r" "$GW" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" "${FAKE_P[@]}"
done
RSS_KB=$(awk '/^VmRSS/ {print $2}' "/proc/$GW_PID_MEM/status" 2>/dev/null || echo 0)

log "miss path: ${ROUNDS} rounds x ${SECS}s at -c$CONNS, then x ${LAT_SECS}s at -c1"
miss_before=$(gw_counts "$GW")
for ((r = 1; r <= ROUNDS; r++)); do
  run miss_gw "$r" "$GW" miss.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" "${FAKE_P[@]}"
  run miss_direct "$r" "$FAKE" miss.lua "$CONNS" "$THREADS" "$SECS" "Bearer bench-upstream-key" "${FAKE_P[@]}"
  if [ "$USE_REDIS" = 1 ]; then
    run miss_gwr "$r" "$GWR" miss.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWR_P[@]}" "${FAKE_P[@]}"
  fi
done
for ((r = 1; r <= ROUNDS; r++)); do
  run lat_gw "$r" "$GW" miss.lua 1 1 "$LAT_SECS" "$AUTH" "${GW_P[@]}" "${FAKE_P[@]}"
  run lat_direct "$r" "$FAKE" miss.lua 1 1 "$LAT_SECS" "Bearer bench-upstream-key" "${FAKE_P[@]}"
  if [ "$USE_REDIS" = 1 ]; then
    run lat_gwr "$r" "$GWR" miss.lua 1 1 "$LAT_SECS" "$AUTH" "${GWR_P[@]}" "${FAKE_P[@]}"
  fi
done
miss_after=$(gw_counts "$GW")
MISS_CHECK=$(awk -v a="$miss_before" -v b="$miss_after" 'BEGIN {
  split(a, x, " "); split(b, y, " ");
  printf "%d hits, %d misses, %d upstream calls", y[1]-x[1], y[2]-x[2], y[3]-x[3] }')

# ---------------------------------------------------------------- summary
# Per arm: req/s = Σrequests / Σseconds; p50/p99 = mean over rounds;
# cpu = server CPU µs per request (all server processes of the arm).
awk -F'\t' -v tck="$CLK_TCK" -v redis="$USE_REDIS" \
    -v secs="$SECS" -v lsecs="$LAT_SECS" -v rounds="$ROUNDS" -v c="$CONNS" -v t="$THREADS" \
    -v ncpu="$(nproc)" -v rb="$RESP_BYTES" -v bb="${#BODY}" \
    -v hitchk="$HIT_CHECK" -v hitrchk="${HITR_CHECK:-}" -v misschk="$MISS_CHECK" -v rss="${RSS_KB:-0}" '
function kv(s, k,   m) { return match(s, k "=[0-9.]+") ? substr(s, RSTART + length(k) + 1, RLENGTH - length(k) - 1) + 0 : 0 }
{
  a = $1; r = $2
  req[a] += kv($3, "requests"); dur[a] += kv($3, "duration_us")
  p50[a] += kv($3, "p50_us"); p99[a] += kv($3, "p99_us"); n[a]++
  bad[a] += kv($3, "non2xx") + kv($3, "sockerr"); cpu[a] += kv($3, "cpu_ticks")
  bytes[a] += kv($3, "bytes_per_req")
  rps[a, r] = kv($3, "requests") / (kv($3, "duration_us") / 1e6)
  q50[a, r] = kv($3, "p50_us")
}
function RPS(a) { return dur[a] ? req[a] / (dur[a] / 1e6) : 0 }
function P50(a) { return n[a] ? p50[a] / n[a] / 1000 : 0 }
function P99(a) { return n[a] ? p99[a] / n[a] / 1000 : 0 }
function CPU(a) { return req[a] ? cpu[a] / tck * 1e6 / req[a] : 0 }
function arm(name, a) {
  return sprintf("%s %6.0f req/s p50 %.3fms p99 %.3fms cpu %.0fus/req%s", name, RPS(a), P50(a), P99(a), CPU(a),
                 bad[a] ? sprintf(" ERRORS %d", bad[a]) : "")
}
function rounds_ratio(a, b,   s, i) {
  s = ""
  for (i = 1; i <= rounds; i++) if (rps[b, i]) s = s sprintf(" %.2f", rps[a, i] / rps[b, i])
  return s
}
function rounds_added(a, b,   s, i) {
  s = ""
  for (i = 1; i <= rounds; i++) s = s sprintf(" %+.3f", (q50[a, i] - q50[b, i]) / 1000)
  return s
}
function hitline(label, g) {
  printf "%-11s: %s | %s | ratio %.2f (rounds%s)\n", label, arm("gateway", g), arm("nginx", "hit_nginx"),
    RPS(g) / RPS("hit_nginx"), rounds_ratio(g, "hit_nginx")
}
function missline(label, g, d) {
  printf "%-11s: %s | %s | ratio %.2f (rounds%s) | added p50 %+.3f ms (rounds%s)\n", label,
    arm("gateway", g), arm("direct ", d), RPS(g) / RPS(d), rounds_ratio(g, d),
    P50(g) - P50(d), rounds_added(g, d)
}
END {
  printf "embedgate bench: %d rounds A/B alternated, %ds per run (-c1 runs %ds), wrk -t%d -c%d, %d cores, request %d B, response %d B\n",
    rounds, secs, lsecs, t, c, ncpu, bb, rb
  hitline("hit", "hit_gw")
  hitline("hit nolimit", "hit_gwn")
  printf "%-11s: hit with rate+quota vs without: ratio %.2f (rounds%s), p50 %+.3f ms, cpu %+.1f us/req\n", "limits cost",
    RPS("hit_gw") / RPS("hit_gwn"), rounds_ratio("hit_gw", "hit_gwn"), P50("hit_gw") - P50("hit_gwn"),
    CPU("hit_gw") - CPU("hit_gwn")
  hitline("hit nojournal", "hit_gwj")
  printf "%-11s: hit with journal vs without (ledger.journal = false): ratio %.2f (rounds%s), p50 %+.3f ms, cpu %+.1f us/req\n", "journal cost",
    RPS("hit_gw") / RPS("hit_gwj"), rounds_ratio("hit_gw", "hit_gwj"), P50("hit_gw") - P50("hit_gwj"),
    CPU("hit_gw") - CPU("hit_gwj")
  if (redis == 1) hitline("hit redis", "hit_gwr")
  printf "%-11s: %s | %s | ratio %.2f (rounds%s) | p99 ratio %.2f\n", "hit log on", arm("gateway", "hitlog_gw"),
    arm("nginx", "hitlog_nginx"), RPS("hitlog_gw") / RPS("hitlog_nginx"), rounds_ratio("hitlog_gw", "hitlog_nginx"),
    P99("hitlog_nginx") ? P99("hitlog_gw") / P99("hitlog_nginx") : 0
  printf "%-11s: %s | %s | ratio %.2f (rounds%s) | bytes/answer gateway %d nginx %d identity %d (%.0f%%)\n", "hit gzip",
    arm("gateway", "hitgz_gw"), arm("nginx", "hitgz_nginx"), RPS("hitgz_gw") / RPS("hitgz_nginx"),
    rounds_ratio("hitgz_gw", "hitgz_nginx"), n["hitgz_gw"] ? bytes["hitgz_gw"] / n["hitgz_gw"] : 0,
    n["hitgz_nginx"] ? bytes["hitgz_nginx"] / n["hitgz_nginx"] : 0, n["hitlog_gw"] ? bytes["hitlog_gw"] / n["hitlog_gw"] : 0,
    (n["hitlog_gw"] && bytes["hitlog_gw"]) ? 100 * (bytes["hitgz_gw"] / n["hitgz_gw"]) / (bytes["hitlog_gw"] / n["hitlog_gw"]) : 0
  printf "%-11s: all hits %s\n", "batch 10", arm("gateway", "batch_hit")
  printf "%-11s: 5/10 hits %s\n", "batch 10", arm("gateway", "batch_half")
  printf "%-11s: all miss %s\n", "batch 10", arm("gateway", "batch_miss")
  printf "%-11s: gateway (memory cache) VmRSS %d KB after the hit and batch phases\n", "rss", rss
  missline("miss -c" c, "miss_gw", "miss_direct")
  if (redis == 1) missline("miss redis", "miss_gwr", "miss_direct")
  missline("miss -c1", "lat_gw", "lat_direct")
  if (redis == 1) missline("miss -c1 rd", "lat_gwr", "lat_direct")
  printf "checks     : gateway hit phase: %s", hitchk
  if (redis == 1) printf "; redis gateway hit phase: %s", hitrchk
  printf "; gateway miss phase: %s\n", misschk
}' "$RESULTS" | tee "${BENCH_OUT:-$ROOT/target/bench-latest.txt}"
