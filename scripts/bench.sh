#!/usr/bin/env bash
# Benchmarks embedgate against same-run baselines on 127.0.0.1 (the cases
# of issue 11; see scripts/BENCH.md) and prints one table of ratios:
#   1 hit, access log off: gateway vs nginx proxy_cache (+ the cost of the
#     limit checks and of the journal, as secondary lines)
#   2 hit, production settings: gateway log at info to a file, Redis-backed
#     rate + quota, vs nginx with access_log buffer=64k (the headline line)
#   3 hit with Accept-Encoding: gzip vs nginx gzip (bytes per answer)
#   4 hit over 4,096 keys, the gateway's VmRSS before/after filling them,
#     and the Redis bytes per cache entry
#   5 miss at 32 connections vs the fake directly and vs nginx as a plain
#     proxy, and at one connection (the added latency)
#   6 text-embedding-v4 batches of 10 texts: all hits, 5 of 10, all misses
#   7 scaling: gateway 1 vs 2 worker threads, nginx 1 vs 2 workers
#   8 BENCH_PROFILE=1: perf profiles of the gateway on a hit and a miss
# Protocol: wrk -t1 -c32, rounds alternate A/B, medians of the rounds; the
# fake upstream answers DashScope-sized 30 KB vectors (--full-precision);
# the gateway runs with TOKIO_WORKER_THREADS=1, nginx with worker_processes 1.
# Nothing is asserted. Every process it starts is stopped on exit.
#
# Env (defaults in brackets): BENCH_SECONDS [5] per run; BENCH_LAT_SECONDS
# [BENCH_SECONDS/2] per one-connection run; BENCH_ROUNDS [2];
# BENCH_CONNECTIONS [32] / BENCH_THREADS [1]: wrk -c / -t;
# BENCH_SCALE_CONNECTIONS [128] / BENCH_SCALE_THREADS [2]: the second load of
# case 7 (its first is BENCH_CONNECTIONS at the same -t); BENCH_KEYS [4096]:
# keys of case 4; BENCH_FULL_PRECISION [1]: 0 for the fake's short (16 KB)
# answers; BENCH_PROFILE [0]: 1 adds case 8 (perf; BENCH_PERF_CALLGRAPH
# [--call-graph dwarf] is passed to perf record: -g walks frame pointers,
# which the release build omits); BENCH_BIN_DIR [target/release]: where embedgate
# and fake-dashscope are; BENCH_BUILD [1 unless BENCH_BIN_DIR is set]: cargo
# build --release first; BENCH_KEEP [0]: 1 keeps the work dir; BENCH_OUT
# [target/bench-latest.txt]: the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START_TIME=$(date +%s)

SECS=${BENCH_SECONDS:-5}
LAT_SECS=${BENCH_LAT_SECONDS:-$(( SECS / 2 > 0 ? SECS / 2 : 1 ))}
ROUNDS=${BENCH_ROUNDS:-2}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-1}
SCALE_CONNS=${BENCH_SCALE_CONNECTIONS:-128}
SCALE_THREADS=${BENCH_SCALE_THREADS:-2}
NKEYS=${BENCH_KEYS:-4096}
FULL=${BENCH_FULL_PRECISION:-1}
PROFILE=${BENCH_PROFILE:-0}
CALLGRAPH=${BENCH_PERF_CALLGRAPH:---call-graph dwarf}
BIN_DIR=${BENCH_BIN_DIR:-$ROOT/target/release}
if [ -n "${BENCH_BIN_DIR:-}" ]; then BUILD=${BENCH_BUILD:-0}; else BUILD=${BENCH_BUILD:-1}; fi
OUT=${BENCH_OUT:-$ROOT/target/bench-latest.txt}
API_PATH=/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding
BODY='{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"The quick brown fox jumps over the lazy dog","factor":1}]},"parameters":{"auto_truncation":true}}'
# Case 4: key i is this body with %d = i.
BODY_FMT='{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"The quick brown fox jumps over the lazy dog %d","factor":1}]},"parameters":{"auto_truncation":true}}'
KEY=bench-key
AUTH="Bearer $KEY"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

for v in SECS LAT_SECS ROUNDS CONNS THREADS SCALE_CONNS SCALE_THREADS NKEYS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
((CONNS <= 64)) || die "BENCH_CONNECTIONS is at most 64 (the fill of case 4 relies on it)"

# ---------------------------------------------------------------- tools
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
{ command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || need+=(redis-server)
if ((${#need[@]})); then
  [ "$(id -u)" -eq 0 ] || die "please install: ${need[*]}"
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ "$PROFILE" = 1 ]; then
  command -v perf >/dev/null 2>&1 || die "BENCH_PROFILE=1 needs perf (linux-perf)"
fi

# Expected duration: the loaded runs (the list of phases below), the
# one-connection runs, and about a minute for starting, filling and checking.
RUNS=$(( ROUNDS * (4 + 2 + 2 + 3 + 8 + 3 + 3) ))
EXPECTED=$(( RUNS * SECS + ROUNDS * 2 * LAT_SECS + 60 ))
[ "$PROFILE" = 1 ] && EXPECTED=$(( EXPECTED + 2 * SECS + 60 ))
log "expected duration: about $(( EXPECTED / 60 )) min $(( EXPECTED % 60 )) s ($RUNS runs of ${SECS}s, $(( ROUNDS * 2 )) of ${LAT_SECS}s)"

if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p embedgate -p fake-dashscope (waits for the cargo lock if others are building)"
  cargo build --release -p embedgate -p fake-dashscope >&2
fi

# ---------------------------------------------------------------- processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/embedgate-bench.XXXXXX")
chmod 755 "$WORK"
PIDS=()       # stopped first
LATE_PIDS=()  # stopped after them: the Redis servers the gateways flush to

# stop_all PID...: TERM, up to 5 s for all of them, then KILL; an nginx
# master's workers too.
stop_all() {
  local p k i alive kids=()
  (($#)) || return 0
  for p in "$@"; do
    kill -0 "$p" 2>/dev/null || continue
    for k in $(ps -o pid= --ppid "$p" 2>/dev/null || true); do kids+=("$k"); done
    kill -TERM "$p" 2>/dev/null || true
  done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for p in "$@"; do if kill -0 "$p" 2>/dev/null; then alive=1; break; fi; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
  for k in "${kids[@]}"; do
    case $(ps -o comm= -p "$k" 2>/dev/null || true) in nginx*) kill -KILL "$k" 2>/dev/null || true ;; esac
  done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
cleanup() {
  stop_all "${PIDS[@]}"
  stop_all "${LATE_PIDS[@]}"
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Copies of the binaries: a rebuild during the run does not change them.
mkdir "$WORK/bin"
for b in embedgate fake-dashscope; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found (being rebuilt? run again)"
  cp "$BIN_DIR/$b" "$WORK/bin/$b" || die "could not copy $BIN_DIR/$b (being rebuilt? run again)"
done
BIN=$WORK/bin/embedgate
FAKE_BIN=$WORK/bin/fake-dashscope
"$BIN" --version >/dev/null 2>&1 || die "$BIN_DIR/embedgate does not run (being rebuilt? run again)"
GW_COMMIT=$(git -C "$BIN_DIR" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
GW_BUILT=$(date -r "$BIN_DIR/embedgate" '+%Y-%m-%d %H:%M' 2>/dev/null || echo unknown)

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

# cpu_ticks PID...: user+system clock ticks summed over every thread of the
# pids (/proc/PID/task/*/stat: tokio workers, the log writer, the journal,
# the blocking pool), plus what threads that have exited already used (the
# process's own line counts them, its threads' lines no longer do).
cpu_ticks() {
  local p
  for p in "$@"; do
    [ -d "/proc/$p" ] || continue
    {
      printf 'P '; sed 's/.*) //' "/proc/$p/stat" 2>/dev/null || echo
      for t in /proc/"$p"/task/*/stat; do printf 'T '; sed 's/.*) //' "$t" 2>/dev/null || echo; done
    } | awk '$1 == "P" { proc = $13 + $14 } $1 == "T" { thr += $13 + $14 } END { print (proc > thr ? proc : thr) + 0 }'
  done | awk '{ t += $1 } END { print t + 0 }'
}
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
vmrss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# fake upstream, latency 0 so the gateway's own overhead shows
FAKE_ARGS=(--listen 127.0.0.1:0 --latency-ms 0)
[ "$FULL" = 1 ] && FAKE_ARGS+=(--full-precision)
"$FAKE_BIN" "${FAKE_ARGS[@]}" >"$WORK/fake.out" 2>"$WORK/fake.err" &
FAKE_PID=$!; PIDS+=("$FAKE_PID")
FAKE=$(wait_line "$WORK/fake.out" 's/^fake-dashscope listening on //p' "$FAKE_PID") \
  || die "fake upstream did not start: $(cat "$WORK/fake.err")"
log "fake upstream $FAKE (${FAKE_ARGS[*]})"

start_redis() { # NAME -> REDIS_PORT, REDIS_PID
  local name=$1 port pid i
  mkdir -p "$WORK/$name"
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$WORK/$name" --daemonize no >"$WORK/$name.log" 2>&1 &
    pid=$!
    for ((i = 0; i < 50; i++)); do
      if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
        LATE_PIDS+=("$pid"); REDIS_PORT=$port; REDIS_PID=$pid
        log "redis $name 127.0.0.1:$port"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    stop_all "$pid"
  done
  die "redis-server $name did not start: $(tail -n5 "$WORK/$name.log")"
}
# The state Redis (rate limits, quotas, ledger) of the production gateway,
# and a Redis holding nothing but the cache entries of case 4.
start_redis redis-state; RS_PORT=$REDIS_PORT; RS_PID=$REDIS_PID
start_redis redis-cache; RC_PORT=$REDIS_PORT

DIGEST=$(printf %s "$KEY" | "$BIN" hash-key)
declare -A GWURL GWPID

# start_gateway NAME WORKERS LOG JOURNAL LIMITS CACHE_LINE STATE_LINE
# LOG: an EMBEDGATE_LOG value, or "" for the gateway's default (info).
start_gateway() {
  local name=$1 workers=$2 loglevel=$3 journal=$4 limits=$5 cache_line=$6 state_line=$7 drop='^$^' url
  local envs=("TOKIO_WORKER_THREADS=$workers" BENCH_UPSTREAM_KEY=bench-upstream-key)
  [ "$limits" = 1 ] || drop='^(rate|quota) = '
  [ -n "$loglevel" ] && envs+=("EMBEDGATE_LOG=$loglevel")
  sed -e "s|@UPSTREAM@|$FAKE|" -e "s|@KEY_SHA256@|$DIGEST|" -e "s|@CACHE_LINE@|$cache_line|" \
    -e "s|@STATE_LINE@|$state_line|" -e "s|@JOURNAL@|$journal|" -e "s|@DATA@|$WORK/$name.data|" \
    "$ROOT/scripts/bench/gateway.toml.tmpl" | grep -Ev "$drop" >"$WORK/$name.toml"
  "$BIN" check-config "$WORK/$name.toml" >/dev/null || die "bad generated config $WORK/$name.toml"
  env -u EMBEDGATE_LOG "${envs[@]}" "$BIN" --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  GWPID[$name]=$!; PIDS+=("$!")
  url=$(wait_line "$WORK/$name.out" '1s/^embedgate listening on //p' "$!") \
    || die "gateway $name did not start: $(cat "$WORK/$name.err")"
  GWURL[$name]=$url
  log "gateway $name $url (${envs[0]}, EMBEDGATE_LOG=${loglevel:-(default: info)}, journal $journal, limits $limits${cache_line:+, $cache_line}${state_line:+, state $state_line})"
}
RS_LINE="redis_url = \"redis://127.0.0.1:$RS_PORT\""
RC_LINE="redis_url = \"redis://127.0.0.1:$RC_PORT\""
# gw: memory cache and state, rate + quota, journal, log warn (cases 1 5 6 7)
start_gateway gw 1 warn true 1 "" ""
# gwn: the same, tenant without rate and quota (the limits cost)
start_gateway gwn 1 warn true 0 "" ""
# gwj: the same, ledger.journal = false (the journal cost)
start_gateway gwj 1 warn false 1 "" ""
# gwl: production settings: log at its default level (info) to a file,
# rate + quota + ledger in Redis, memory cache (cases 2 3 8)
start_gateway gwl 1 "" true 1 "" "$RS_LINE"
# gwk: as gw, fresh, for the 4,096 keys and its VmRSS (case 4)
start_gateway gwk 1 warn true 1 "" ""
# gwd: as gwk with cache.compact_form = "digits" (case 4: 8 bytes a float,
# cheaper to write back, against float32's 4)
start_gateway gwd 1 warn true 1 'compact_form = "digits"' ""
# gwc: cache in its own Redis, state in the state Redis (case 4, Redis bytes)
start_gateway gwc 1 warn true 1 "$RC_LINE" "$RS_LINE"
# gw2: as gw with 2 worker threads (case 7)
start_gateway gw2 2 warn true 1 "" ""

# start_nginx NAME WORKERS -> NG_PORT NG_PORT2 NG_PORT3, NG_PIDS (master, workers, cache processes)
start_nginx() {
  local name=$1 workers=$2 dir=$WORK/$1 user_line="" started=0 pid i
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && user_line="user root;"
  for _ in 1 2 3 4 5; do
    NG_PORT=$(free_port); NG_PORT2=$(free_port); NG_PORT3=$(free_port)
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$NG_PORT|" -e "s|@PORT2@|$NG_PORT2|" -e "s|@PORT3@|$NG_PORT3|" \
      -e "s|@WORKERS@|$workers|" -e "s|@USER_LINE@|$user_line|" -e "s|@UPSTREAM_HOSTPORT@|${FAKE#http://}|" \
      "$ROOT/scripts/bench/nginx.conf.tmpl" >"$dir/nginx.conf"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout" 2>&1 &
    pid=$!
    for ((i = 0; i < 50; i++)); do
      if curl -s -o /dev/null "http://127.0.0.1:$NG_PORT/" && curl -s -o /dev/null "http://127.0.0.1:$NG_PORT2/" \
        && curl -s -o /dev/null "http://127.0.0.1:$NG_PORT3/"; then started=1; break; fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ $started = 1 ]; then PIDS+=("$pid"); break; fi
    stop_all "$pid"
  done
  [ $started = 1 ] || die "nginx $name did not start: $(tail -n5 "$dir/error.log" "$dir/stdout" 2>/dev/null)"
  sleep 0.2
  NG_PIDS=("$pid")
  for i in $(ps -o pid= --ppid "$pid"); do NG_PIDS+=("$i"); done
  log "nginx $name 127.0.0.1:$NG_PORT (cache) :$NG_PORT2 (cache, log, gzip) :$NG_PORT3 (proxy): $(ps -o args= --ppid "$pid" | sort | uniq -c | tr -s ' ' | paste -sd, - || true)"
}
start_nginx nginx1 1
NG=http://127.0.0.1:$NG_PORT; NGL=http://127.0.0.1:$NG_PORT2; NGP=http://127.0.0.1:$NG_PORT3; NG1_P=("${NG_PIDS[@]}")
start_nginx nginx2 2
NG2=http://127.0.0.1:$NG_PORT; NG2_P=("${NG_PIDS[@]}")

# ---------------------------------------------------------------- checks
post() { # URL BODY HEADER... -> response headers on stdout
  local url=$1 body=$2; shift 2
  curl -sS -m 10 -o /dev/null -D - "$url$API_PATH" -H 'Content-Type: application/json' "$@" -d "$body"
}
warm_hit() { # URL HEADER_NAME BODY HEADER...: repeats until the answer says HIT
  local url=$1 hname=$2 body=$3 i; shift 3
  for ((i = 0; i < 5; i++)); do
    if post "$url" "$body" "$@" | tr -d '\r' | grep -qi "^$hname: HIT"; then return 0; fi
  done
  die "$url never answered $hname: HIT"
}
for g in gw gwn gwj gwl gwk gwd gw2; do warm_hit "${GWURL[$g]}" x-cache "$BODY" -H "Authorization: $AUTH"; done
warm_hit "$NG" x-cache-status "$BODY"
warm_hit "$NG2" x-cache-status "$BODY"
warm_hit "$NGL" x-cache-status "$BODY"
RESP_BYTES=$(curl -sS -m 10 "${GWURL[gw]}$API_PATH" -H "Authorization: $AUTH" -H 'Content-Type: application/json' -d "$BODY" | wc -c)

# gw_counts NAME: "hits non-hits upstream-responses log-lines-dropped" from its /metrics
gw_counts() {
  curl -sS -m 10 "${GWURL[$1]}/metrics" | awk '
    /^embedgate_requests_total\{/ { if ($0 ~ /cache="hit"/) h += $NF; else n += $NF }
    /^embedgate_upstream_responses_total\{/ { u += $NF }
    /^embedgate_log_lines_dropped_total/ { d += $NF }
    END { printf "%d %d %d %d\n", h, n, u, d }'
}
declare -A SNAP
snap() { local g; for g in "$@"; do SNAP[$g]=$(gw_counts "$g"); done; }
# since NAME...: the counters' change since snap, summed over the gateways
since() {
  local g
  for g in "$@"; do printf '%s %s\n' "${SNAP[$g]}" "$(gw_counts "$g")"; done |
    awk '{ h += $5 - $1; n += $6 - $2; u += $7 - $3 } END { printf "%d %d %d\n", h, n, u }'
}

# ---------------------------------------------------------------- runs
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# run LABEL ROUND URL SCRIPT CONNS THREADS SECS AUTH PID... [-- PID...]
# CPU is measured for the pids before "--" (the arm's server) and, apart,
# for those after it (the fake upstream on a miss, the state Redis).
run() {
  local label=$1 round=$2 url=$3 script=$4 c=$5 t=$6 s=$7 auth=$8 main=() extra=() b1 b2 a1 a2 out line
  shift 8
  while (($#)); do
    if [ "$1" = -- ]; then shift; extra=("$@"); break; fi
    main+=("$1"); shift
  done
  b1=$(cpu_ticks "${main[@]}"); b2=$(cpu_ticks "${extra[@]}")
  out=$(BENCH_BODY=$BODY BENCH_BODY_FMT=$BODY_FMT BENCH_KEYS=$NKEYS \
    BENCH_AUTH=$auth BENCH_PATH=$API_PATH BENCH_ACCEPT_ENCODING=${AE:-} BENCH_BATCH_MODE=${BATCH_MODE:-hit} \
    BENCH_NONCE="b$$-$label-r$round-$RANDOM" \
    timeout -k 5 $(( s + 30 )) wrk -t "$t" -c "$c" -d "${s}s" --timeout 5s \
    -s "$ROOT/scripts/bench/$script" "$url") || die "wrk failed for $label: $out"
  a1=$(cpu_ticks "${main[@]}"); a2=$(cpu_ticks "${extra[@]}")
  line=$(printf '%s\n' "$out" | sed -n 's/^BENCH //p')
  [ -n "$line" ] || die "no result from wrk for $label: $out"
  printf '%s\t%s\t%s cpu_ticks=%d cpu2_ticks=%d\n' "$label" "$round" "$line" $(( a1 - b1 )) $(( a2 - b2 )) >>"$RESULTS"
  log "$label round $round: $line cpu_ticks=$(( a1 - b1 ))+$(( a2 - b2 ))"
}
kv() { sed -n "s/.*\\b$1=\\([0-9.]*\\).*/\\1/p" <<<"$2"; }

# fill LABEL URL AUTH: every one of the NKEYS keys once (keys.lua, -t1 -c32);
# keys.lua creates a file when done, and SIGINT makes wrk stop there.
fill() {
  local label=$1 url=$2 auth=$3 done=$WORK/$1.done pid i n line t0
  t0=$(date +%s%N)
  BENCH_BODY_FMT=$BODY_FMT BENCH_KEYS=$NKEYS BENCH_KEYS_FILL=1 BENCH_KEYS_FILL_DONE=$done \
    BENCH_AUTH=$auth BENCH_PATH=$API_PATH \
    wrk -t 1 -c 32 -d 300s --timeout 5s -s "$ROOT/scripts/bench/keys.lua" "$url" >"$WORK/$label.out" 2>&1 &
  pid=$!; PIDS+=("$pid")
  for ((i = 0; i < 3000; i++)); do
    [ -e "$done" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" || true
  line=$(sed -n 's/^BENCH //p' "$WORK/$label.out")
  if [ ! -e "$done" ] || [ -z "$line" ]; then die "fill $label did not finish: $(cat "$WORK/$label.out")"; fi
  n=$(kv requests "$line")
  (( n >= NKEYS )) || die "fill $label: $n requests for $NKEYS keys"
  if [ "$(kv non2xx "$line")" != 0 ] || [ "$(kv sockerr "$line")" != 0 ]; then die "fill $label: errors: $line"; fi
  log "$label: $n requests in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $line"
}

GW_P=("${GWPID[gw]}")
GWL_P=("${GWPID[gwl]}" -- "$RS_PID")   # the gateway; apart, its state Redis
FAKE_P=("$FAKE_PID")
HIT_GWS=(gw gwn gwj gwl gw2)
snap "${HIT_GWS[@]}"

log "case 1: hit, access log off (+ limits and journal cost): ${ROUNDS} rounds x ${SECS}s, wrk -t$THREADS -c$CONNS"
for ((r = 1; r <= ROUNDS; r++)); do
  run hit_gw "$r" "${GWURL[gw]}" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}"
  run hit_ng "$r" "$NG" post.lua "$CONNS" "$THREADS" "$SECS" "" "${NG1_P[@]}"
  run hit_gwn "$r" "${GWURL[gwn]}" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWPID[gwn]}"
  run hit_gwj "$r" "${GWURL[gwj]}" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWPID[gwj]}"
done

log "case 2: hit, production settings (log at info to a file, Redis rate + quota) vs nginx access_log buffer=64k"
rs_commands() { redis-cli -p "$RS_PORT" info stats | tr -d '\r' | awk -F: '/^total_commands_processed:/ { print $2 }'; }
LOG_BYTES=0 RS_CMDS=0
for ((r = 1; r <= ROUNDS; r++)); do
  s0=$(stat -c %s "$WORK/gwl.err"); c0=$(rs_commands)
  run hitlog_gw "$r" "${GWURL[gwl]}" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWL_P[@]}"
  sleep 0.2  # the log writer's queue
  LOG_BYTES=$(( LOG_BYTES + $(stat -c %s "$WORK/gwl.err") - s0 ))
  RS_CMDS=$(( RS_CMDS + $(rs_commands) - c0 ))
  run hitlog_ng "$r" "$NGL" post.lua "$CONNS" "$THREADS" "$SECS" "" "${NG1_P[@]}"
done

log "case 3: hit with Accept-Encoding: gzip (production gateway vs nginx gzip on)"
for ((r = 1; r <= ROUNDS; r++)); do
  AE=gzip run hitgz_gw "$r" "${GWURL[gwl]}" post.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWL_P[@]}"
  AE=gzip run hitgz_ng "$r" "$NGL" post.lua "$CONNS" "$THREADS" "$SECS" "" "${NG1_P[@]}"
done

log "case 7: scaling, 1 vs 2 workers, wrk -t$SCALE_THREADS at -c$CONNS and -c$SCALE_CONNS"
for c in "$CONNS" "$SCALE_CONNS"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    run "sc${c}_gw1" "$r" "${GWURL[gw]}" post.lua "$c" "$SCALE_THREADS" "$SECS" "$AUTH" "${GW_P[@]}"
    run "sc${c}_ng1" "$r" "$NG" post.lua "$c" "$SCALE_THREADS" "$SECS" "" "${NG1_P[@]}"
    run "sc${c}_gw2" "$r" "${GWURL[gw2]}" post.lua "$c" "$SCALE_THREADS" "$SECS" "$AUTH" "${GWPID[gw2]}"
    run "sc${c}_ng2" "$r" "$NG2" post.lua "$c" "$SCALE_THREADS" "$SECS" "" "${NG2_P[@]}"
  done
done
read -r H1 N1 U1 < <(since "${HIT_GWS[@]}")
DROPPED=$(gw_counts gwl | awk '{ print $4 }')

log "case 4: $NKEYS keys: fill, then ${ROUNDS} rounds x ${SECS}s"
sleep 1
RSS0=$(vmrss_kb "${GWPID[gwk]}"); RSSD0=$(vmrss_kb "${GWPID[gwd]}")
fill fill_gwk "${GWURL[gwk]}" "$AUTH"
fill fill_gwd "${GWURL[gwd]}" "$AUTH"
sleep 1
RSS1=$(vmrss_kb "${GWPID[gwk]}"); RSSD1=$(vmrss_kb "${GWPID[gwd]}")
fill fill_ng "$NG" ""
for i in 0 $(( NKEYS / 2 )) $(( NKEYS - 1 )); do
  # shellcheck disable=SC2059
  b=$(printf "$BODY_FMT" "$i")
  for g in gwk gwd; do
    post "${GWURL[$g]}" "$b" -H "Authorization: $AUTH" | tr -d '\r' | grep -qi '^x-cache: HIT' || die "$g: key $i not cached after the fill"
  done
  post "$NG" "$b" | tr -d '\r' | grep -qi '^x-cache-status: HIT' || die "nginx: key $i not cached after the fill"
done
snap gwk gwd
for ((r = 1; r <= ROUNDS; r++)); do
  run keys_gw "$r" "${GWURL[gwk]}" keys.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWPID[gwk]}"
  run keys_ng "$r" "$NG" keys.lua "$CONNS" "$THREADS" "$SECS" "" "${NG1_P[@]}"
  run keys_gwd "$r" "${GWURL[gwd]}" keys.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GWPID[gwd]}"
done
read -r H2 N2 U2 < <(since gwk gwd)
RSS2=$(vmrss_kb "${GWPID[gwk]}"); RSSD2=$(vmrss_kb "${GWPID[gwd]}")

log "case 4: Redis bytes per cache entry ($NKEYS keys through a gateway with cache.redis_url)"
rc() { redis-cli -p "$RC_PORT" "$@" | tr -d '\r'; }
used_memory() { rc info memory | awk -F: '/^used_memory:/ { print $2 }'; }
RC_DB0=$(rc dbsize); RC_MEM0=$(used_memory)
fill fill_gwc "${GWURL[gwc]}" "$AUTH"
prev=-1
for ((i = 0; i < 50; i++)); do  # the entries are written after the answers
  RC_DB1=$(rc dbsize)
  [ "$RC_DB1" = "$prev" ] && (( RC_DB1 - RC_DB0 >= NKEYS )) && break
  prev=$RC_DB1; sleep 0.2
done
RC_MEM1=$(used_memory)
RC_KEYS=$( (rc --scan --pattern 'eg:c:*' || true) | head -n 16)
# Mean value length and mean MEMORY USAGE (with the sample size) of RC_KEYS.
rc_strlen() { for k in $RC_KEYS; do rc strlen "$k"; done | awk '{ s += $1; n++ } END { if (n) printf "%.0f", s / n; else print 0 }'; }
rc_usage() { for k in $RC_KEYS; do rc memory usage "$k" samples 0; done | awk '{ s += $1; n++ } END { if (n) printf "%.0f %d", s / n, n; else print "0 0" }'; }
# How many of RC_KEYS still hold text (eg1:).
rc_text() { for k in $RC_KEYS; do rc getrange "$k" 0 3; done | grep -c '^eg1:' || true; }
RC_USAGE=$(rc_usage)
RC_STRLEN=$(rc_strlen)
# The same keys once every entry was hit: a hit queues the entry's
# compaction, which rewrites its Redis value in a compact form (these
# identity hits: the float32 form, eg4: (eg3: with cache.compact_form =
# "digits"); a gzip client's: DEFLATE, eg2:).
# The queue is bounded (compact::QUEUE_JOBS): a pass over all the keys
# overflows it and the dropped ones are asked again by their next hit, so
# up to 4 passes, each followed by a wait until the values stop changing,
# until none of the sampled keys holds text.
for ((pass = 1; pass <= 4; pass++)); do
  fill "hit_gwc$pass" "${GWURL[gwc]}" "$AUTH"
  prev=-1
  for ((i = 0; i < 100; i++)); do  # until the compaction thread is done
    RC_STRLEN2=$(rc_strlen)
    [ "$RC_STRLEN2" = "$prev" ] && break
    prev=$RC_STRLEN2; sleep 0.5
  done
  (( $(rc_text) == 0 )) && break
done
RC_PASSES=$(( pass > 4 ? 4 : pass ))
RC_LEFT=$(rc_text)
RC_USAGE2=$(rc_usage)

log "case 6: text-embedding-v4 10-text batches: all hits, 5/10 hits, all misses"
for ((r = 1; r <= ROUNDS; r++)); do
  BATCH_MODE=hit run batch_hit "$r" "${GWURL[gw]}" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}"
  BATCH_MODE=half run batch_half "$r" "${GWURL[gw]}" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" -- "${FAKE_P[@]}"
  BATCH_MODE=miss run batch_miss "$r" "${GWURL[gw]}" batch.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" -- "${FAKE_P[@]}"
done

log "case 5: miss at -c$CONNS (vs the fake direct and nginx proxy), then at -c1 (${LAT_SECS}s)"
snap gw
for ((r = 1; r <= ROUNDS; r++)); do
  run miss_gw "$r" "${GWURL[gw]}" miss.lua "$CONNS" "$THREADS" "$SECS" "$AUTH" "${GW_P[@]}" -- "${FAKE_P[@]}"
  run miss_direct "$r" "$FAKE" miss.lua "$CONNS" "$THREADS" "$SECS" "Bearer bench-upstream-key" "${FAKE_P[@]}"
  run miss_ngp "$r" "$NGP" miss.lua "$CONNS" "$THREADS" "$SECS" "Bearer bench-upstream-key" "${NG1_P[@]}" -- "${FAKE_P[@]}"
done
for ((r = 1; r <= ROUNDS; r++)); do
  run lat_gw "$r" "${GWURL[gw]}" miss.lua 1 1 "$LAT_SECS" "$AUTH" "${GW_P[@]}" -- "${FAKE_P[@]}"
  run lat_direct "$r" "$FAKE" miss.lua 1 1 "$LAT_SECS" "Bearer bench-upstream-key" "${FAKE_P[@]}"
done
read -r H3 N3 U3 < <(since gw)

PROFILE_TXT=$WORK/profile.txt
: >"$PROFILE_TXT"
if [ "$PROFILE" = 1 ]; then
  # profile LABEL URL SCRIPT PID: perf record on PID during one run
  profile() {
    local label=$1 url=$2 script=$3 pid=$4 perf_pid data=$WORK/perf-$1.data
    # shellcheck disable=SC2086
    perf record $CALLGRAPH -N -q -p "$pid" -o "$data" >"$WORK/perf-$label.log" 2>&1 &
    perf_pid=$!; PIDS+=("$perf_pid")
    sleep 0.5
    run "prof_$label" 1 "$url" "$script" "$CONNS" "$THREADS" "$SECS" "$AUTH" "$pid"
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    {
      printf '\nprofile %s (perf record %s -p <gateway>, %ss at wrk -t%s -c%s): top symbols by self time\n' \
        "$label" "$CALLGRAPH" "$SECS" "$THREADS" "$CONNS"
      perf report -i "$data" --stdio --no-children --sort dso,symbol -g none 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | grep -v '\[unknown\]' | head -n 15 | cut -c1-160 | sed 's/ *$//' || true
      printf 'profile %s: top symbols by children (self + callees; without the async plumbing: poll wrappers, closures, inlined frames)\n' "$label"
      perf report -i "$data" --stdio --children --sort dso,symbol -g none 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | grep -v '\[unknown\]' \
        | grep -Ev '\] (poll|poll_[a-z_]*|with_mut|call_once|and_then|map|\{[a-z_#0-9]*\})[<( ]|\] (<core::future|<tracing::instrument|tokio::runtime::task|<hyper|<tower|<futures)|\(inlined\)' \
        | head -n 15 | cut -c1-160 | sed 's/ *$//' || true
    } >>"$PROFILE_TXT"
  }
  log "case 8: perf on the production gateway (hit) and on gw (miss)"
  profile hit "${GWURL[gwl]}" post.lua "${GWPID[gwl]}"
  profile miss "${GWURL[gw]}" miss.lua "${GWPID[gw]}"
fi

# ---------------------------------------------------------------- summary
ELAPSED=$(( $(date +%s) - START_TIME ))
WRK_V=$(wrk -v 2>&1 | head -n1 | awk '{ print $2 }' || true)
NGINX_V=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
REDIS_V=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
{
  printf 'embedgate bench %s: gateway %s (%s, built %s); %d s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    "$GW_COMMIT" "$BIN_DIR/embedgate" "$GW_BUILT" "$ELAPSED"
  printf 'machine: nproc %s, kernel %s, %s, wrk %s, redis %s\n' "$(nproc)" "$(uname -r)" "$NGINX_V" "$WRK_V" "$REDIS_V"
  printf 'protocol: wrk -t%s -c%s, %s rounds x %ss alternating A/B (-c1: %ss), medians of the rounds; gateway TOKIO_WORKER_THREADS=1 vs nginx worker_processes 1; request %d B, answer %d B%s\n' \
    "$THREADS" "$CONNS" "$ROUNDS" "$SECS" "$LAT_SECS" "${#BODY}" "$RESP_BYTES" "$([ "$FULL" = 1 ] && echo ' (fake --full-precision)')"
  printf '\n'
} >"$WORK/header.txt"

awk -F'\t' -v tck="$CLK_TCK" -v rb="$RESP_BYTES" -v nkeys="$NKEYS" -v c="$CONNS" -v sc="$SCALE_CONNS" \
    -v st="$SCALE_THREADS" -v logb="$LOG_BYTES" -v rscmds="$RS_CMDS" -v dropped="${DROPPED:-0}" \
    -v rss0="$RSS0" -v rss1="$RSS1" -v rss2="$RSS2" -v rssd0="$RSSD0" -v rssd1="$RSSD1" -v rssd2="$RSSD2" \
    -v rcdb0="$RC_DB0" -v rcdb1="$RC_DB1" -v rcmem0="$RC_MEM0" -v rcmem1="$RC_MEM1" \
    -v rcusage="$RC_USAGE" -v rcstrlen="$RC_STRLEN" -v rcusage2="$RC_USAGE2" -v rcstrlen2="$RC_STRLEN2" -v rcpasses="$RC_PASSES" -v rcleft="$RC_LEFT" \
    -v h1="$H1" -v n1="$N1" -v u1="$U1" -v h2="$H2" -v n2="$N2" -v u2="$U2" -v h3="$H3" -v n3="$N3" -v u3="$U3" '
function kv(s, k) { return match(s, "(^| )" k "=[0-9.]+") ? substr(s, RSTART, RLENGTH) : "" }
function num(s, k,   v) { v = kv(s, k); sub(/.*=/, "", v); return v + 0 }
{
  a = $1; i = ++nr[a]
  req[a, i] = num($3, "requests"); tot[a] += req[a, i]; sec = num($3, "duration_us") / 1e6
  rps[a, i] = sec ? req[a, i] / sec : 0
  p50[a, i] = num($3, "p50_us") / 1000; p99[a, i] = num($3, "p99_us") / 1000
  cpu[a, i] = req[a, i] ? num($3, "cpu_ticks") / tck * 1e6 / req[a, i] : 0
  cpu2[a, i] = req[a, i] ? num($3, "cpu2_ticks") / tck * 1e6 / req[a, i] : 0
  bytes[a, i] = num($3, "bytes_per_req")
  err[a] += num($3, "non2xx") + num($3, "sockerr")
  if (num($3, "non2xx") + num($3, "sockerr")) errs = errs sprintf(" %s(round %d): %d", a, i, num($3, "non2xx") + num($3, "sockerr"))
}
function med(arr, a,   n, i, j, v, t) {
  n = nr[a]; if (!n) return 0
  for (i = 1; i <= n; i++) v[i] = arr[a, i]
  for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
  return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function k(x) { return x >= 10000 ? sprintf("%.1fk", x / 1000) : x >= 1000 ? sprintf("%.2fk", x / 1000) : sprintf("%.0f", x) }
function ms(x) { return x >= 10 ? sprintf("%.1f", x) : sprintf("%.2f", x) }
function cpucell(a,   s) {
  s = sprintf("%.0f", med(cpu, a))
  if (med(cpu2, a) > 0) s = s sprintf(" (+%.0f)", med(cpu2, a))
  return s
}
function arm(a) {
  if (!nr[a]) return sprintf("%9s | %6s | %6s | %9s", "", "", "", "")
  return sprintf("%9s | %6s | %6s | %9s", k(med(rps, a)) (err[a] ? "!" : ""), ms(med(p50, a)), ms(med(p99, a)), cpucell(a))
}
function ratio(a, b) { return med(rps, b) ? med(rps, a) / med(rps, b) : 0 }
function rounds(a, b,   s, i) {
  s = ""
  for (i = 1; i <= nr[a]; i++) s = s (s == "" ? "" : " ") sprintf("%.2f", rps[b, i] ? rps[a, i] / rps[b, i] : 0)
  return s
}
function row(name, a, bname, b, notes,   r, p) {
  r = b == "" ? "" : sprintf("%.2f (%s)", ratio(a, b), rounds(a, b))
  p = (b == "" || !med(p99, b)) ? "" : sprintf("%.2f", med(p99, a) / med(p99, b))
  printf "| %-36s | %s | %-24s | %s | %-17s | %5s | %s |\n", name, arm(a), bname, arm(b), r, p, notes
}
function pct(x, y) { return y ? sprintf("%.0f%%", 100 * x / y) : "?" }
END {
  printf "| %-36s | %9s | %6s | %6s | %9s | %-24s | %9s | %6s | %6s | %9s | %-17s | %5s | %s |\n", "case", "gw req/s", "p50 ms", "p99 ms", "CPU us/rq",
    "baseline", "req/s", "p50 ms", "p99 ms", "CPU us/rq", "ratio (rounds)", "p99 x", "notes"
  printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "---", "--:", "--:", "--:", "--:", "---", "--:", "--:", "--:", "--:", "---", "--:", "---"
  row("1 hit, log off", "hit_gw", "nginx proxy_cache", "hit_ng", "rate + quota + journal, memory state")
  row("1 hit, tenant without limits", "hit_gwn", "nginx proxy_cache", "hit_ng", "")
  row("1 hit, ledger.journal = false", "hit_gwj", "nginx proxy_cache", "hit_ng", "")
  row("1 limits cost", "hit_gw", "same without limits", "hit_gwn", sprintf("%+.1f us CPU per hit", med(cpu, "hit_gw") - med(cpu, "hit_gwn")))
  row("1 journal cost", "hit_gw", "same without journal", "hit_gwj", sprintf("%+.1f us CPU per hit", med(cpu, "hit_gw") - med(cpu, "hit_gwj")))
  row("2 hit, production settings", "hitlog_gw", "nginx access_log 64k", "hitlog_ng",
    sprintf("HEADLINE; gateway: log info to a file (%.0f B/request, %d lines dropped), rate + quota + ledger in Redis (+n: its CPU; %.2f commands/request)",
      tot["hitlog_gw"] ? logb / tot["hitlog_gw"] : 0, dropped, tot["hitlog_gw"] ? rscmds / tot["hitlog_gw"] : 0))
  gzg = med(bytes, "hitgz_gw"); gzn = med(bytes, "hitgz_ng"); idg = med(bytes, "hitlog_gw"); idn = med(bytes, "hitlog_ng")
  row("3 hit, Accept-Encoding: gzip", "hitgz_gw", "nginx gzip on", "hitgz_ng",
    sprintf("bytes/answer incl. headers: gateway %d (%s of identity %d), nginx %d (%s of %d)", gzg, pct(gzg, idg), idg, gzn, pct(gzn, idn), idn))
  row(sprintf("4 hit over %d keys", nkeys), "keys_gw", "nginx proxy_cache", "keys_ng",
    sprintf("gateway (compact_form = float32, the default) VmRSS %.1f MB before the fill, %.1f MB after (+%.1f KB/key), %.1f MB after the runs", rss0 / 1024, rss1 / 1024, (rss1 - rss0) / nkeys, rss2 / 1024))
  row(sprintf("4 hit over %d keys, compact_form = digits", nkeys), "keys_gwd", "nginx proxy_cache", "keys_ng",
    sprintf("gateway VmRSS %.1f MB before the fill, %.1f MB after, %.1f MB after the runs", rssd0 / 1024, rssd1 / 1024, rssd2 / 1024))
  split(rcusage, ru, " "); split(rcusage2, ru2, " ")
  row("4 Redis bytes per cache entry", "", "", "",
    sprintf("%d keys added; fresh (text): MEMORY USAGE mean %d B (%d keys; value %d B), used_memory delta / keys %.0f B; the same keys once hit (compact, eg4: float32 form, %d pass(es) over the keys, %d of them still text): %d B (value %d B); answer %d B",
      rcdb1 - rcdb0, ru[1], ru[2], rcstrlen, (rcdb1 - rcdb0) ? (rcmem1 - rcmem0) / (rcdb1 - rcdb0) : 0, rcpasses, rcleft, ru2[1], rcstrlen2, rb))
  row("5 miss -c" c, "miss_gw", "fake direct", "miss_direct",
    sprintf("added p50 %+.3f ms; (+n): CPU of the fake", med(p50, "miss_gw") - med(p50, "miss_direct")))
  row("5 miss -c" c ", vs nginx proxy", "miss_gw", "nginx proxy, no cache", "miss_ngp",
    sprintf("nginx proxy / direct %.2f (%s)", ratio("miss_ngp", "miss_direct"), rounds("miss_ngp", "miss_direct")))
  row("5 miss -c1", "lat_gw", "fake direct", "lat_direct",
    sprintf("added p50 %+.3f ms per miss", med(p50, "lat_gw") - med(p50, "lat_direct")))
  row("6 v4 batch 10 texts, all hits", "batch_hit", "", "", "")
  row("6 v4 batch 10 texts, 5 of 10 hits", "batch_half", "", "", "(+n): CPU of the fake")
  row("6 v4 batch 10 texts, all misses", "batch_miss", "", "", "(+n): CPU of the fake")
  split(c " " sc, cs, " ")
  for (j = 1; j <= 2; j++) {
    row(sprintf("7 hit -t%d -c%d, 1 worker", st, cs[j]), "sc" cs[j] "_gw1", "nginx 1 worker", "sc" cs[j] "_ng1", "")
    row(sprintf("7 hit -t%d -c%d, 2 workers", st, cs[j]), "sc" cs[j] "_gw2", "nginx 2 workers", "sc" cs[j] "_ng2",
      sprintf("2 vs 1 worker: gateway %.2f (%s), nginx %.2f (%s)", ratio("sc" cs[j] "_gw2", "sc" cs[j] "_gw1"), rounds("sc" cs[j] "_gw2", "sc" cs[j] "_gw1"),
        ratio("sc" cs[j] "_ng2", "sc" cs[j] "_ng1"), rounds("sc" cs[j] "_ng2", "sc" cs[j] "_ng1")))
  }
  printf "\nchecks: hit phases (cases 1 2 3 7; gateways gw gwn gwj gwl gw2): %d hits, %d non-hits, %d upstream calls; case 4 hit runs (gwk gwd): %d hits, %d non-hits, %d upstream calls; miss phase (case 5, gw): %d hits, %d misses, %d upstream calls; wrk errors:%s\n",
    h1, n1, u1, h2, n2, u2, h3, n3, u3, errs == "" ? " none" : errs
  printf "req/s, p50, p99, CPU: medians of the rounds; ratio = gateway / baseline req/s, per round in brackets; p99 x = gateway p99 / baseline p99; CPU = user+system us per request of the server processes, every thread (/proc/PID/task/*/stat), (+n) = the arm extra processes (Redis, the fake upstream); ! = the arm had errors\n"
}' "$RESULTS" >"$WORK/table.txt"

mkdir -p "$(dirname "$OUT")"
cat "$WORK/header.txt" "$WORK/table.txt" "$PROFILE_TXT" | tee "$OUT"
log "written to $OUT ($ELAPSED s)"
