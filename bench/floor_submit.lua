--[[
  The floor of lua/submit_score-7.lua, for `python -m bench.script_cost --floor`: the
  increment and its event, none of the checks (no ready marker, rate limit, idempotency,
  range, rank, flush request or top-N). The same keys and arguments; never used by the
  service. Its cost is what any script that counts and persists an update pays.
]]
-- per call --
local total = redis.call("ZINCRBY", KEYS[1], -tonumber(ARGV[2]), ARGV[1])
redis.call("XADD", KEYS[4], "*", "e", ARGV[3], "u", ARGV[1], "d", ARGV[2])
return {0, -tonumber(total), 1, 0, 0, 0, 0, ""}
