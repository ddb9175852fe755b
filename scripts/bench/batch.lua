-- wrk script: a 10-text batch on the text-embedding route (text-embedding-v4).
-- BENCH_BATCH_MODE: "hit" (the same 10 texts every time), "half" (5 of
-- them fixed, 5 unique per request) or "miss" (10 unique texts).
-- Env: BENCH_NONCE, BENCH_AUTH.
local mode = os.getenv("BENCH_BATCH_MODE") or "hit"
local nonce = os.getenv("BENCH_NONCE") or tostring(os.time())
local path = "/api/v1/services/embeddings/text-embedding/text-embedding"
local headers = { ["Content-Type"] = "application/json" }
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  headers["Authorization"] = auth
end

local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
end

local counter = 0
function request()
  counter = counter + 1
  local texts = {}
  for i = 1, 10 do
    local fixed = mode == "hit" or (mode == "half" and i <= 5)
    if fixed then
      texts[i] = string.format('"fixed text number %d about foxes and dogs"', i)
    else
      texts[i] = string.format('"%s t%d n%d i%d about foxes and dogs"', nonce, tid, counter, i)
    end
  end
  local body = '{"model":"text-embedding-v4","input":{"texts":[' .. table.concat(texts, ",") ..
    ']},"parameters":{"dimension":1024}}'
  return wrk.format("POST", path, headers, body)
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
