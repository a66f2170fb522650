--[[
  forget_consumer: delete a consumer of a stream's group if, and only if, it holds no pending
  entry and has been idle for long enough, in one step.

  Checked and deleted apart, a consumer that comes back in between (a worker that was stalled,
  not dead) would lose the entries it has just read: delivered, but no longer pending, so
  never reclaimed, and trimmed away.

  Input:
    KEYS[1] events   STREAM the partition's accepted increments
    ARGV[1] group name
    ARGV[2] consumer name
    ARGV[3] minimum idle time, ms

  Output: 1 if the consumer was deleted, else 0 (unknown, holding entries, or not idle enough)
  Events: XGROUP DELCONSUMER
]]
local rcall = redis.call

local events_key = KEYS[1]
local group = ARGV[1]
local consumer = ARGV[2]
local idle_ms = tonumber(ARGV[3])

if idle_ms == nil or idle_ms < 0 then return redis.error_reply("ERR forget_consumer: bad idle time") end

local ok, consumers = pcall(rcall, "XINFO", "CONSUMERS", events_key, group)
if not ok then return 0 end -- no stream or no group: no consumer to forget

for _, info in ipairs(consumers) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if fields["name"] == consumer then
    if tonumber(fields["pending"]) == 0 and tonumber(fields["idle"]) >= idle_ms then
      rcall("XGROUP", "DELCONSUMER", events_key, group, consumer)
      return 1
    end
    return 0
  end
end
return 0
