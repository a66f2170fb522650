-- wrk script: POST /api/v1/score, cycling through many users and their own tokens.
--
-- Environment:
--   BENCH_TOKENS    file of "<user_id> <token>" lines
--   BENCH_DELAY_MS  mean pause before each request, exponentially distributed (paced runs);
--                   unset or 0: closed loop, as fast as the server answers
-- Prints one line "BENCH_JSON {...}" with throughput, latency percentiles and errors.

local tokens_path = os.getenv("BENCH_TOKENS")
local mean_delay = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local threads = {}
local reqs = {}
local n = 0
local i = 0

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  -- every request is built once, here: request() only picks the next one
  for line in io.lines(tokens_path) do
    local user, token = line:match("^(%S+) (%S+)$")
    if user then
      n = n + 1
      reqs[n] = wrk.format("POST", "/api/v1/score", {
        ["Authorization"] = "Bearer " .. token,
        ["Content-Type"] = "application/json",
      }, '{"user_id":"' .. user .. '","score_increase":1}')
    end
  end
  -- threads start at different users
  i = ((thread_index or 0) * 7919) % n
  math.randomseed(os.time() + (thread_index or 0))
end

function request()
  i = i % n + 1
  return reqs[i]
end

if mean_delay > 0 then
  -- wrk truncates the delay to whole milliseconds: +0.5 keeps the mean where it was asked
  function delay()
    return -math.log(1 - math.random()) * mean_delay + 0.5
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
