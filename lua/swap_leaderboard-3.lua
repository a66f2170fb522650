--[[
  swap_leaderboard: replace a partition's leaderboard with one rebuilt from Postgres, atomically.

  The rebuilt ZSET accounts for every increment up to the events stream id ARGV[1]. The hot
  path kept accepting increments while it was built: those (the stream's entries after that
  id) are replayed onto it here, in the same atomic step as the RENAME, so none is lost.
  Increments for users the rebuilt ZSET does not hold are not replayed (Postgres does not know
  those users).

  Input:
    KEYS[1] rebuilt       ZSET  member user_id, score -total (same hash tag as the others)
    KEYS[2] leaderboard   ZSET  replaced by KEYS[1]
    KEYS[3] events        STREAM e=<event id> u=<user_id> d=<delta>
    ARGV[1] last stream id the rebuilt ZSET accounts for ("0-0": none)

  Output: the number of increments replayed
  Events: none (the caller publishes the new top-N)
]]
local rcall = redis.call

local rebuilt_key = KEYS[1]
local leaderboard_key = KEYS[2]
local events_key = KEYS[3]
local last_id = ARGV[1]

if last_id == nil or not string.match(last_id, "^%d+%-%d+$") then
  return redis.error_reply("ERR swap_leaderboard: bad stream id")
end

local replayed = 0
for _, entry in ipairs(rcall("XRANGE", events_key, "(" .. last_id, "+")) do
  local fields, user_id, delta = entry[2], nil, nil
  for i = 1, #fields - 1, 2 do
    if fields[i] == "u" then user_id = fields[i + 1] end
    if fields[i] == "d" then delta = fields[i + 1] end
  end
  if user_id and delta and rcall("ZSCORE", rebuilt_key, user_id) then
    -- scores are stored negated; %d, not tostring, keeps large integers exact
    rcall("ZINCRBY", rebuilt_key, string.format("%d", -tonumber(delta)), user_id)
    replayed = replayed + 1
  end
end

if rcall("EXISTS", rebuilt_key) == 1 then
  rcall("RENAME", rebuilt_key, leaderboard_key)
else
  rcall("DEL", leaderboard_key)
end
return replayed
