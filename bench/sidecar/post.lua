-- wrk script: POST the JSON body in $BODY to $TARGET_PATH and print the
-- result as one JSON line (latency in microseconds) prefixed "RESULT ".
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.path = os.getenv("TARGET_PATH")
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, ' ..
    '"mean_us": %.1f, "max_us": %.1f, "err_connect": %d, "err_read": %d, "err_write": %d, ' ..
    '"err_status": %d, "err_timeout": %d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
