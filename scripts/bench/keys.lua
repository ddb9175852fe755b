-- wrk script: the hit path over many keys. Request i carries body
-- string.format(BENCH_BODY_FMT, i % BENCH_KEYS): BENCH_KEYS distinct bodies,
-- cycled through (each thread from its own offset).
-- BENCH_KEYS_FILL=1: the fill run (one thread, at most 64 connections): keys
-- in order; after BENCH_KEYS + 64 answers the thread stops and creates the
-- file BENCH_KEYS_FILL_DONE, on which scripts/bench.sh ends wrk (SIGINT: wrk
-- would otherwise sleep the whole -d). A request is sent only when one of
-- the (at most 64) in flight has been answered, so by then every key's first
-- request has been answered, and a following run finds them all cached (a
-- request cut off at the stop is a repeat).
-- Env: BENCH_BODY_FMT (JSON body with one %d), BENCH_KEYS (4096),
--      BENCH_KEYS_FILL, BENCH_KEYS_FILL_DONE, BENCH_AUTH (optional), BENCH_PATH.
local path = os.getenv("BENCH_PATH") or "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
local fmt = os.getenv("BENCH_BODY_FMT")
local n = tonumber(os.getenv("BENCH_KEYS") or "4096")
local fill = os.getenv("BENCH_KEYS_FILL") == "1"
local headers = { ["Content-Type"] = "application/json" }
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  headers["Authorization"] = auth
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- The requests are formatted once, so a request costs wrk what post.lua's does.
local reqs = {}
local counter = 0
local answered = 0
function init(args)
  for i = 0, n - 1 do
    reqs[i] = wrk.format("POST", path, headers, string.format(fmt, i))
  end
  counter = fill and 0 or math.floor(tid * 7919) % n
end

function request()
  local r = reqs[counter % n]
  counter = counter + 1
  return r
end

if fill then
  function response(status, headers, body)
    answered = answered + 1
    if answered == n + 64 then
      local f = io.open(os.getenv("BENCH_KEYS_FILL_DONE"), "w")
      if f then f:close() end
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%.1f non2xx=%d sockerr=%d bytes_per_req=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout,
    summary.requests > 0 and math.floor(summary.bytes / summary.requests) or 0))
end
