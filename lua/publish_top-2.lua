--[[
  publish_top: append a partition's current top-N to its top stream, unconditionally.

  For changes made outside submit_score (provisioning, rebuild, repair): the live clients and
  GET /api/v1/leaderboard read the latest top stream entry, so it must follow the ZSET.

  Input:
    KEYS[1] leaderboard   ZSET  member user_id, score -total
    KEYS[2] top           STREAM the top-N as user_id/-score pairs
    ARGV[1] top N
    ARGV[2] top stream MAXLEN

  Output: the new top stream id (the leaderboard version)
  Events: XADD top
]]
local rcall = redis.call
local unpack = unpack or table.unpack -- Lua 5.1 (Redis, fakeredis); 5.2+ moved it

local leaderboard_key = KEYS[1]
local top_key = KEYS[2]
local top_n = tonumber(ARGV[1])
local top_maxlen = tonumber(ARGV[2])

if top_n == nil or top_n < 1 then return redis.error_reply("ERR publish_top: bad top N") end
if top_maxlen == nil or top_maxlen < 1 then return redis.error_reply("ERR publish_top: bad MAXLEN") end

local top = rcall("ZRANGE", leaderboard_key, 0, top_n - 1, "WITHSCORES")
if #top == 0 then
  -- an empty leaderboard is still a version; a stream entry needs one field
  return rcall("XADD", top_key, "MAXLEN", "~", string.format("%d", top_maxlen), "*", "", "")
end
return rcall("XADD", top_key, "MAXLEN", "~", string.format("%d", top_maxlen), "*", unpack(top))
