-- wrk script: the same POST on every request (the HIT path).
-- Env: BENCH_BODY (JSON body), BENCH_AUTH (Authorization value, optional),
--      BENCH_PATH (request path), BENCH_ACCEPT_ENCODING (optional).
-- Also reports the bytes read per request (bytes_per_req).
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end
-- BENCH_ACCEPT_ENCODING: e.g. "gzip" for the compressed runs.
local ae = os.getenv("BENCH_ACCEPT_ENCODING")
if ae and ae ~= "" then
  wrk.headers["Accept-Encoding"] = ae
end

-- One machine-readable line for scripts/bench.sh (latencies in microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%.1f non2xx=%d sockerr=%d bytes_per_req=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout,
    summary.requests > 0 and math.floor(summary.bytes / summary.requests) or 0))
end
