-- wrk script: a distinct body on every request (the MISS path).
-- The text is "<nonce> t<thread> n<counter> ...", unique per request and,
-- through BENCH_NONCE, per run, so nothing is ever answered from a cache.
-- Env: BENCH_NONCE, BENCH_AUTH (optional), BENCH_PATH.
local path = os.getenv("BENCH_PATH") or "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
local nonce = os.getenv("BENCH_NONCE") or tostring(os.time())
local headers = { ["Content-Type"] = "application/json" }
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  headers["Authorization"] = auth
end
local template = '{"model":"multimodal-embedding-one-peace-v1","input":{"contents":' ..
  '[{"text":"%s t%d n%d the quick brown fox","factor":1}]},"parameters":{"auto_truncation":true}}'

local threads = {}
local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

local counter = 0
function request()
  counter = counter + 1
  return wrk.format("POST", path, headers, string.format(template, nonce, tid, counter))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%.1f non2xx=%d sockerr=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout))
end
