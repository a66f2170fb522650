--[[
  trim_events: trim a partition's events stream below the oldest entry some consumer group
  still needs, in one step.

  An entry may go once its group has it acknowledged: below the group's oldest pending entry,
  or, when nothing is pending, up to its last-delivered id. Read and trim are one atomic step,
  so an XREADGROUP between them (the persister reads the next batch while the current one
  commits) cannot make delivered, still pending entries look trimmable.

  Input:
    KEYS[1] events   STREAM the partition's accepted increments, with its consumer groups

  Output: the number of entries trimmed (0 when the stream or its groups do not exist)
  Events: XTRIM events
]]
local rcall = redis.call

local events_key = KEYS[1]

local ok, groups = pcall(rcall, "XINFO", "GROUPS", events_key)
if not ok or #groups == 0 then return 0 end -- a wiped Redis: nothing is known to be safe

local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end

-- an id as {ms, seq}, compared numerically (ids are far below 2^53)
local function parse(id)
  local ms, seq = string.match(id, "^(%d+)-(%d+)$")
  return {tonumber(ms), tonumber(seq)}
end

local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

local floor = nil -- the smallest id some group still needs
for _, group in ipairs(groups) do
  local name = field(group, "name")
  local needed
  if tonumber(field(group, "pending")) > 0 then
    needed = parse(rcall("XPENDING", events_key, name)[2])
  else
    local last = parse(field(group, "last-delivered-id"))
    needed = {last[1], last[2] + 1}
  end
  if floor == nil or less(needed, floor) then floor = needed end
end

return rcall("XTRIM", events_key, "MINID", string.format("%d-%d", floor[1], floor[2]))
