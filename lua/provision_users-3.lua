--[[
  provision_users: make users known to the hot path, at score 0; an existing member keeps
  its score. While a rebuild is in progress (KEYS[3] exists) they are added to the rebuilt
  leaderboard too, in the same atomic step: their increments from now on are replayed onto it
  by the swap, and they are never missing after it (lua/swap_leaderboard-5.lua).

  Input:
    KEYS[1] leaderboard   ZSET  member user_id, score -total
    KEYS[2] rebuilt       ZSET  the leaderboard a rebuild is filling (same hash tag)
    KEYS[3] progress      HASH  present while a rebuild of the partition is in progress
    ARGV    the user ids

  Output: the number of users new to KEYS[1]
  Events: none (the caller publishes the new top-N when users were added)
]]
local rcall = redis.call

if #KEYS ~= 3 then return redis.error_reply("ERR provision_users: takes 3 keys") end
if #ARGV == 0 then return 0 end

local members = {}
for _, user_id in ipairs(ARGV) do
  members[#members + 1] = "0"
  members[#members + 1] = user_id
end

local added = 0
local rebuilding = rcall("EXISTS", KEYS[3]) == 1
-- in slices: unpack has a limit on the number of values (LUAI_MAXCSTACK)
for i = 1, #members, 2000 do
  local slice = {unpack(members, i, math.min(i + 1999, #members))}
  added = added + rcall("ZADD", KEYS[1], "NX", unpack(slice))
  if rebuilding then rcall("ZADD", KEYS[2], "NX", unpack(slice)) end
end
return added
