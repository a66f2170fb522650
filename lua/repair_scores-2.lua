--[[
  repair_scores: apply one chunk of `reconcile --repair`'s corrections to a partition's
  leaderboard, at most once. The chunk's token is remembered (KEYS[2]) in the same atomic
  step as the corrections: sent again after a lost reply, the call changes nothing.

  Corrections are increments (they commute with the hot path's own updates made since the
  drift was measured), an add for a user Redis lost, and a removal for a member Postgres does
  not know.

  Input:
    KEYS[1] leaderboard   ZSET  member user_id, score -total
    KEYS[2] applied       STRING the chunk's marker (same hash tag), kept ARGV[1] seconds
    ARGV[1] marker TTL seconds
    ARGV[2..] triples: op, user_id, value
              op "incr": ZINCRBY value (only if the user is a member)
              op "add":  ZADD NX at value (only if not a member)
              op "rem":  remove the user
              values are in the ZSET's own terms: scores are stored negated (-total)

  Output: the number of corrections applied, or -1 if this chunk was applied already
  Events: none (the caller publishes the new top-N)
]]
local rcall = redis.call

if #KEYS ~= 2 then return redis.error_reply("ERR repair_scores: takes 2 keys") end
local ttl = tonumber(ARGV[1])
if ttl == nil or ttl < 1 or (#ARGV - 1) % 3 ~= 0 then
  return redis.error_reply("ERR repair_scores: bad arguments")
end
for i = 2, #ARGV, 3 do
  local op, value = ARGV[i], ARGV[i + 2]
  if (op ~= "incr" and op ~= "add" and op ~= "rem") or not string.match(value, "^-?%d+$") then
    return redis.error_reply("ERR repair_scores: bad correction")
  end
end

if not rcall("SET", KEYS[2], "1", "NX", "EX", ARGV[1]) then return -1 end
local applied = 0
for i = 2, #ARGV, 3 do
  local op, user_id, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == "rem" then
    applied = applied + rcall("ZREM", KEYS[1], user_id)
  elseif op == "add" then
    applied = applied + rcall("ZADD", KEYS[1], "NX", value, user_id)
  elseif rcall("ZSCORE", KEYS[1], user_id) then
    rcall("ZINCRBY", KEYS[1], value, user_id)
    applied = applied + 1
  end
end
return applied
