-- POSTs one fixed request body and prints the run's numbers as one JSON line.
--
--   wrk ... -s bench/wrk/post.lua URL -- BODY_FILE ["Header: value" ...]
--
-- The request is built once per thread (no per-request Lua), so the script costs the load
-- generator nothing on the hot path. done() prints latency percentiles in microseconds and the
-- count of responses with a status >= 400, which wrk tallies itself.

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   for i = 2, #args do
      local name, value = args[i]:match("^([^:]+):%s*(.*)$")
      if name then
         wrk.headers[name] = value
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRK_RESULT {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"status_errors\":%d," ..
      "\"connect_errors\":%d,\"read_errors\":%d,\"write_errors\":%d,\"timeouts\":%d," ..
      "\"mean_us\":%.1f,\"max_us\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
      "\"p999_us\":%d}\n",
      summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
      e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
