--[[
  swap_leaderboard: catch a partition's rebuilt leaderboard up with the increments the hot path
  accepted while it was built, a bounded chunk per call, then replace the live leaderboard with
  it, atomically. Safe to send again after a lost reply: every call moves the progress record
  in the same atomic step as its writes, and the swap leaves the rebuild's token in the ready
  marker, so a repeated call continues, or answers "swapped", and never replays twice.

  The rebuild (persister.rebuild) wrote KEYS[4] before it read Postgres: token = its own,
  upto = the last events stream id the rebuilt ZSET accounts for. Users provisioned since then
  were added to KEYS[1] as well (lua/provision_users-3.lua), so every user the swap brings in
  is in KEYS[1], and each of the entries after `upto` is replayed onto its user exactly once.

  Input:
    KEYS[1] rebuilt       ZSET  member user_id, score -total (same hash tag as the others)
    KEYS[2] leaderboard   ZSET  replaced by KEYS[1]
    KEYS[3] events        STREAM e=<event id> u=<user_id> d=<delta>
    KEYS[4] progress      HASH  token, upto (stream id); deleted by the swap
    KEYS[5] ready         STRING the partition's ready marker; set to the token by the swap
    ARGV[1] the rebuild's token
    ARGV[2] at most this many stream entries are replayed by one call (a bound on the time
            Redis is blocked)

  Output: {swapped, replayed, scanned}
    swapped   0: entries may remain, call again; 1: swapped by this call; 2: swapped already
              (a repeated call after a lost reply: nothing was done)
    replayed  increments applied to KEYS[1] by this call
    scanned   stream entries read by this call (at most ARGV[2])
  A call for a rebuild that is not the current one (another rebuild began since, or the keys
  are gone) is an error reply; nothing is written. The live leaderboard is never deleted for a
  missing KEYS[1] then: only the current rebuild's swap replaces it.
  Events: none (the caller publishes the new top-N)
]]
local rcall = redis.call

if #KEYS ~= 5 then return redis.error_reply("ERR swap_leaderboard: takes 5 keys") end
local rebuilt_key, leaderboard_key, events_key, progress_key, ready_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local token = ARGV[1]
local limit = tonumber(ARGV[2])
if token == nil or token == "" then return redis.error_reply("ERR swap_leaderboard: no token") end
if limit == nil or limit < 1 or limit ~= math.floor(limit) then
  return redis.error_reply("ERR swap_leaderboard: bad chunk size")
end

if rcall("HGET", progress_key, "token") ~= token then
  if rcall("GET", ready_key) == token then return {2, 0, 0} end
  return redis.error_reply("ERR swap_leaderboard: rebuild " .. token .. " is not in progress")
end
local upto = rcall("HGET", progress_key, "upto")
if not upto or not string.match(upto, "^%d+%-%d+$") then
  return redis.error_reply("ERR swap_leaderboard: bad progress record")
end

local entries = rcall("XRANGE", events_key, "(" .. upto, "+", "COUNT", limit)
local replayed = 0
for _, entry in ipairs(entries) do
  local fields, user_id, delta = entry[2], nil, nil
  for i = 1, #fields - 1, 2 do
    if fields[i] == "u" then user_id = fields[i + 1] end
    if fields[i] == "d" then delta = fields[i + 1] end
  end
  -- users Postgres does not know are not in the rebuilt ZSET: their increments are dropped
  if user_id and delta and rcall("ZSCORE", rebuilt_key, user_id) then
    -- scores are stored negated; %d, not tostring, keeps large integers exact
    rcall("ZINCRBY", rebuilt_key, string.format("%d", -tonumber(delta)), user_id)
    replayed = replayed + 1
  end
end

if #entries == limit then
  -- maybe more: remember how far this call went, and leave the rest to the next call
  rcall("HSET", progress_key, "upto", entries[#entries][1])
  return {0, replayed, #entries}
end

-- caught up with the stream's end, in this atomic step: swap
if rcall("EXISTS", rebuilt_key) == 1 then
  rcall("RENAME", rebuilt_key, leaderboard_key)
else
  rcall("DEL", leaderboard_key) -- this rebuild found no user in the partition
end
rcall("SET", ready_key, token)
rcall("DEL", progress_key)
return {1, replayed, #entries}
