--[[
  submit_score: add `delta` to one user's score, atomically.

  Every check runs before the first write (Redis does not roll back a script that fails
  halfway), in the order the API promises: rate limit, idempotency, user existence, range.

  Scores are stored NEGATED in the leaderboard ZSET so that ascending order (ZRANK, ZRANGE)
  is "best first" and equal scores fall back to Redis's own byte order of the member: equal
  scores share a rank and are listed by user_id ascending. Numbers are passed to Redis through string.format('%d'),
  never tostring: Lua's "%.14g" would silently round totals near 2^53.

  Input:
    KEYS[1] leaderboard   ZSET  member user_id, score -total
    KEYS[2] rate          STRING GCRA theoretical arrival time (microseconds, Redis clock)
    KEYS[3] idempotency   STRING "<delta>:<new_total>" for (user, Idempotency-Key), or unused
    KEYS[4] events        STREAM e=<event id> u=<user_id> d=<delta>, drained by the persister
    KEYS[5] top           STREAM the new top-N as user_id/-score pairs, only when it changed
    KEYS[6] flush flag    STRING set when a persister flush must be requested

    ARGV[1]  user_id
    ARGV[2]  delta                 integer, non-zero
    ARGV[3]  event id              made by the service (UUID), unique per accepted increment
    ARGV[4]  use idempotency key   "1" or "0"
    ARGV[5]  emission interval     microseconds per request; "0" disables rate limiting
    ARGV[6]  burst                 requests allowed at once
    ARGV[7]  max |delta|
    ARGV[8]  top N
    ARGV[9]  idempotency TTL       seconds
    ARGV[10] allow negative delta  "1" for operator adjustments, "0" for players
    ARGV[11] top stream MAXLEN     approximate cap; the top stream is a broadcast, not a log
    ARGV[12] flush flag TTL        seconds; a lost flush request is retried after this

  Output: {status, total, rank, retry_after_us, remaining, reset_after_us, flush, top_version}
    status  0 OK, 1 REPLAY, 2 RATE_LIMITED, 3 UNKNOWN_USER, 4 OUT_OF_RANGE,
            5 IDEMPOTENCY_MISMATCH (mirrored by service.scripts.Status)
    total   the user's score after this call (the first call's, for a replay); 0 if refused
    rank    1 + the number of users with a strictly higher score (ties share a rank), after
            this call; 0 if refused
    flush   1 if the caller must ask the persister for a flush
    top_version  the top stream id appended by this call, or ""

  Events: XADD events (every accepted increment); XADD top (when the top-N changed).
]]
local rcall = redis.call
local unpack = unpack or table.unpack -- Lua 5.1 (Redis) and 5.4 (fakeredis)

local leaderboard_key = KEYS[1]
local rate_key = KEYS[2]
local idempotency_key = KEYS[3]
local events_key = KEYS[4]
local top_key = KEYS[5]
local flush_key = KEYS[6]

local user_id = ARGV[1]
local delta = tonumber(ARGV[2])
local event_id = ARGV[3]
local use_idempotency = ARGV[4] == "1"
local interval = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local max_delta = tonumber(ARGV[7])
local top_n = tonumber(ARGV[8])
local idempotency_ttl = tonumber(ARGV[9])
local allow_negative = ARGV[10] == "1"
local top_maxlen = tonumber(ARGV[11])
local flush_ttl = tonumber(ARGV[12])

local MAX_SCORE = 9007199254740991 -- 2^53 - 1: the largest integer a double holds exactly

local OK, REPLAY, RATE_LIMITED, UNKNOWN_USER, OUT_OF_RANGE, IDEMPOTENCY_MISMATCH = 0, 1, 2, 3, 4, 5

local function int(n)
  return string.format("%d", n)
end

local function is_int(n)
  return n ~= nil and n == math.floor(n) and n > -MAX_SCORE and n < MAX_SCORE
end

-- Misuse by the caller is an error reply, never a silent partial write.
if user_id == nil or user_id == "" then return redis.error_reply("ERR submit_score: empty user_id") end
if not is_int(delta) or delta == 0 then return redis.error_reply("ERR submit_score: bad delta") end
if event_id == nil or event_id == "" then return redis.error_reply("ERR submit_score: empty event id") end
if not is_int(interval) or interval < 0 then return redis.error_reply("ERR submit_score: bad interval") end
if not is_int(burst) or burst < 1 then return redis.error_reply("ERR submit_score: bad burst") end
if not is_int(max_delta) or max_delta < 1 then return redis.error_reply("ERR submit_score: bad max") end
if not is_int(top_n) or top_n < 1 then return redis.error_reply("ERR submit_score: bad top N") end
if not is_int(idempotency_ttl) or idempotency_ttl < 1 then return redis.error_reply("ERR submit_score: bad TTL") end
if not is_int(top_maxlen) or top_maxlen < 1 then return redis.error_reply("ERR submit_score: bad MAXLEN") end
if not is_int(flush_ttl) or flush_ttl < 1 then return redis.error_reply("ERR submit_score: bad flush TTL") end
if delta < 0 and not allow_negative then return {OUT_OF_RANGE, 0, 0, 0, 0, 0, 0, ""} end
if math.abs(delta) > max_delta then return {OUT_OF_RANGE, 0, 0, 0, 0, 0, 0, ""} end

-- 1. Rate limit: GCRA on Redis's clock (go-redis/redis_rate). Nothing is written yet.
local new_tat, remaining, reset_after = nil, 0, 0
if interval > 0 then
  local t = rcall("TIME")
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tat = tonumber(rcall("GET", rate_key)) or now
  if tat < now then tat = now end
  new_tat = tat + interval
  local diff = now - (new_tat - interval * burst)
  if diff < 0 then
    return {RATE_LIMITED, 0, 0, -diff, 0, tat - now, 0, ""}
  end
  remaining = math.floor(diff / interval)
  reset_after = new_tat - now
end

local function rank_of(member)
  local score = rcall("ZSCORE", leaderboard_key, member)
  if not score then return 0 end
  return rcall("ZCOUNT", leaderboard_key, "-inf", "(" .. score) + 1
end

local function spend_rate()
  if new_tat ~= nil then
    rcall("SET", rate_key, int(new_tat), "PX", int(math.ceil(reset_after / 1000)))
  end
end

-- 2. Idempotency: a replay returns the first result and adds nothing.
if use_idempotency then
  local record = rcall("GET", idempotency_key)
  if record then
    local first_delta, first_total = string.match(record, "^(-?%d+):(-?%d+)$")
    if tonumber(first_delta) ~= delta then
      return {IDEMPOTENCY_MISMATCH, 0, 0, 0, remaining, reset_after, 0, ""}
    end
    spend_rate()
    return {REPLAY, tonumber(first_total), rank_of(user_id), 0, remaining, reset_after, 0, ""}
  end
end

-- 3. The user must have been provisioned.
local stored = rcall("ZSCORE", leaderboard_key, user_id)
if not stored then
  return {UNKNOWN_USER, 0, 0, 0, remaining, reset_after, 0, ""}
end

-- 4. Never round: refuse a total a double cannot hold exactly, or a negative one.
local total = -tonumber(stored) + delta
if total > MAX_SCORE or total < 0 then
  return {OUT_OF_RANGE, 0, 0, 0, remaining, reset_after, 0, ""}
end

-- Every check has passed: from here on, only writes.
spend_rate()
local rank_before = rcall("ZRANK", leaderboard_key, user_id)
rcall("ZADD", leaderboard_key, "XX", int(-total), user_id)
local position = rcall("ZRANK", leaderboard_key, user_id)
if use_idempotency then
  rcall("SET", idempotency_key, int(delta) .. ":" .. int(total), "EX", int(idempotency_ttl))
end
rcall("XADD", events_key, "*", "e", event_id, "u", user_id, "d", int(delta))
local flush = 0
if rcall("SET", flush_key, "1", "NX", "EX", int(flush_ttl)) then flush = 1 end

-- A member of the top N changed score, or someone entered it: publish the new top N.
local top_version = ""
if rank_before < top_n or position < top_n then
  local top = rcall("ZRANGE", leaderboard_key, 0, top_n - 1, "WITHSCORES")
  top_version = rcall("XADD", top_key, "MAXLEN", "~", int(top_maxlen), "*", unpack(top))
end

return {OK, total, rcall("ZCOUNT", leaderboard_key, "-inf", "(" .. int(-total)) + 1, 0, remaining,
  reset_after, flush, top_version}
