--[[
  submit_score: add `delta` to one user's score, atomically.

  Every check runs before the first write (Redis does not roll back a script that fails
  halfway), in the order the API promises: rate limit, idempotency, user existence, range
  of the new total. A delta that is out of range by itself (negative for a player, larger
  than the maximum) is refused before all of them, like any other bad request body.
  Only an accepted increment (OK) and a replay (REPLAY) spend the caller's rate allowance.

  Scores are stored NEGATED in the leaderboard ZSET so that ascending order (ZRANK, ZRANGE)
  is "best first" and equal scores fall back to Redis's own byte order of the member: equal
  scores share a rank and are listed by user_id ascending. Numbers are passed to Redis
  through string.format('%d'), never tostring: Lua's "%.14g" would silently round totals
  near 2^53.

  Input:
    KEYS[1] leaderboard   ZSET  member user_id, score -total
    KEYS[2] rate          STRING GCRA theoretical arrival time (microseconds, Redis clock)
    KEYS[3] idempotency   STRING "<delta>:<new_total>:<rank>" for (user, Idempotency-Key), or
                                 unused; a record restored by a rebuild has no ":<rank>"
    KEYS[4] events        STREAM e=<event id> u=<user_id> d=<delta>, and with an Idempotency-Key
                                 also k=<the key> t=<new total> (rebuild restores the record
                                 from them); drained by the persister
    KEYS[5] top           STREAM the new top-N as user_id/-score pairs, only when it changed
    KEYS[6] flush flag    STRING set when a persister flush must be requested
    KEYS[7] ready         STRING the partition's ready marker, set by the swap of a rebuild;
                                 missing (a new or wiped Redis): NOT_READY, nothing written

    ARGV[1]  user_id
    ARGV[2]  delta                 integer, non-zero
    ARGV[3]  event id              made by the service (a UUIDv7), unique per accepted
                                   increment, with or without an Idempotency-Key
    ARGV[4]  Idempotency-Key       the caller's key in its stored form (an operator's is
                                   prefixed: service.keys.stored_idempotency_key), or "" for
                                   none (KEYS[3] is then unused)
    ARGV[5]  settings              eight numbers, one space between each, in this order:
             emission interval     microseconds per request; "0" disables rate limiting
             burst                 requests allowed at once
             max |delta|
             top N
             idempotency TTL       seconds
             allow negative delta  "1" for operator adjustments, "0" for players
             top stream MAXLEN     approximate cap; the top stream is a broadcast, not a log
             flush flag TTL        seconds; a lost flush request is retried after this
    Numbers are decimal integers, settings from 0 or 1 up to 2^53-1; anything else is
    misuse. The settings are one argument: they are the same on every call of a process,
    and as a Function (below) they are parsed once per distinct string, not per call.

  Two ways to run it, the same code (service.scripts): by EVAL/EVALSHA, the whole file per
  call; or (Redis 7) as a Function, the part above the line `-- per call --` run once when
  the library is loaded (its helpers, and the settings it has parsed, kept from call to
  call) and the part below it as the function's body, KEYS and ARGV its arguments. The part
  above may not touch a global when it runs: a library being loaded has none (not even
  `string`).

  Output: {status, total, rank, retry_after_us, remaining, reset_after_us, flush, top_version}
    status  0 OK, 1 REPLAY, 2 RATE_LIMITED, 3 UNKNOWN_USER, 4 OUT_OF_RANGE,
            5 IDEMPOTENCY_MISMATCH, 6 NOT_READY (mirrored by service.scripts.Status)
    total   the user's score after this call (the first call's, for a replay); 0 if refused
    rank    1 + the number of users with a strictly higher score (ties share a rank), after
            this call (the first call's, for a replay); 0 if refused, or for a replay of a
            record that does not know it (restored by a rebuild)
    retry_after_us  when RATE_LIMITED, the wait until one request is allowed again; else 0
    remaining       requests still allowed right now, after this call (0 when rate limiting
                    is off, or when the delta alone was out of range: the limit is not read)
    reset_after_us  the wait until the full burst is available again
    flush   1 if the caller must ask the persister for a flush
    top_version  the top stream id appended by this call, or ""

  Misuse (wrong key or argument count, a malformed argument) is an error reply; nothing
  is written.

  Events: XADD events (every accepted increment); XADD top (when the top-N changed).
]]
local MAX_SCORE = 9007199254740991 -- 2^53 - 1: the largest integer a double holds exactly

-- A decimal integer, or nil: tonumber alone would also take "1e3", "0x10", " 7" and "nan".
local function int_arg(s)
  if type(s) ~= "string" or not string.match(s, "^-?%d+$") then return nil end
  return tonumber(s)
end

-- A setting: an integer from `low` to 2^53-1, or nil.
local function setting(s, low)
  local n = int_arg(s)
  if n == nil or n < low or n > MAX_SCORE then return nil end
  return n
end

local function flag_arg(s)
  if s == "1" then return true elseif s == "0" then return false end
  return nil
end

local function int(n)
  return string.format("%d", n)
end

-- Settings strings already parsed, and what they hold (as a Function: kept between calls).
local parsed = {}
local parsed_count = 0

-- The eight settings of ARGV[5], or nil when any is malformed.
local function settings_of(s)
  local known = parsed[s]
  if known ~= nil then return known end
  local a, b, c, d, e, f, g, h =
    string.match(s, "^(%d+) (%d+) (%d+) (%d+) (%d+) ([01]) (%d+) (%d+)$")
  if a == nil then return nil end
  local settings = {setting(a, 0), setting(b, 1), setting(c, 1), setting(d, 1), setting(e, 1),
    flag_arg(f), setting(g, 1), setting(h, 1)}
  for i = 1, 8 do
    if settings[i] == nil then return nil end
  end
  if parsed_count >= 64 then parsed, parsed_count = {}, 0 end -- bounded: a process has two
  parsed[s], parsed_count = settings, parsed_count + 1
  return settings
end

-- per call --
local rcall = redis.call
local unpack = unpack or table.unpack -- Lua 5.1 (Redis, fakeredis); 5.2+ moved it

if #KEYS ~= 7 then return redis.error_reply("ERR submit_score: takes 7 keys") end
if #ARGV ~= 5 then return redis.error_reply("ERR submit_score: takes 5 arguments") end

local leaderboard_key = KEYS[1]
local rate_key = KEYS[2]
local idempotency_key = KEYS[3]
local events_key = KEYS[4]
local top_key = KEYS[5]
local flush_key = KEYS[6]
local ready_key = KEYS[7]

local user_id = ARGV[1]
local delta = int_arg(ARGV[2])
local event_id = ARGV[3]
local request_key = ARGV[4]
local use_idempotency = request_key ~= ""
local settings = settings_of(ARGV[5])
if settings == nil then return redis.error_reply("ERR submit_score: bad settings") end
local interval, burst, max_delta, top_n, idempotency_ttl, allow_negative, top_maxlen, flush_ttl =
  unpack(settings)

local OK, REPLAY, RATE_LIMITED, UNKNOWN_USER, OUT_OF_RANGE, IDEMPOTENCY_MISMATCH = 0, 1, 2, 3, 4, 5
local NOT_READY = 6

-- Misuse by the caller is an error reply, never a silent partial write.
if user_id == "" then return redis.error_reply("ERR submit_score: empty user_id") end
if delta == nil or delta == 0 then return redis.error_reply("ERR submit_score: bad delta") end
if event_id == "" then return redis.error_reply("ERR submit_score: empty event id") end
-- max_delta <= 2^53-1, so this also refuses any delta a double cannot hold exactly
if delta < 0 and not allow_negative then return {OUT_OF_RANGE, 0, 0, 0, 0, 0, 0, ""} end
if math.abs(delta) > max_delta then return {OUT_OF_RANGE, 0, 0, 0, 0, 0, 0, ""} end

-- 0. A Redis that lost its data (or was never filled) knows no user yet: not a 404, a 503.
if rcall("EXISTS", ready_key) == 0 then return {NOT_READY, 0, 0, 0, 0, 0, 0, ""} end

-- 1. Rate limit: GCRA on Redis's clock (go-redis/redis_rate). Nothing is written yet.
-- `remaining` and `reset_after` describe the allowance as it stands; spend_rate() moves them
-- when the call is accepted, so a refused call reports an allowance it did not touch.
local now, tat, remaining, reset_after = 0, 0, 0, 0
if interval > 0 then
  local t = rcall("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  tat = tonumber(rcall("GET", rate_key)) or now
  if tat < now then tat = now end
  local allow_at = tat + interval - interval * burst -- the earliest time this call may pass
  if now < allow_at then
    return {RATE_LIMITED, 0, 0, allow_at - now, 0, tat - now, 0, ""}
  end
  remaining = math.floor((now - allow_at) / interval) + 1
  reset_after = tat - now
end

local function spend_rate()
  if interval > 0 then
    tat = tat + interval
    remaining = remaining - 1
    reset_after = tat - now
    rcall("SET", rate_key, int(tat), "PX", int(math.ceil(reset_after / 1000)))
  end
end

-- 2. Idempotency: a replay returns the first result (total and rank) and adds nothing.
if use_idempotency then
  local record = rcall("GET", idempotency_key)
  if record then
    local first_delta, first_total, first_rank = string.match(record, "^(-?%d+):(-?%d+):?(%d*)$")
    if tonumber(first_delta) ~= delta then
      return {IDEMPOTENCY_MISMATCH, 0, 0, 0, remaining, reset_after, 0, ""}
    end
    spend_rate()
    -- a record restored by a rebuild has no rank (the ledger does not keep it): 0
    local rank = tonumber(first_rank) or 0
    return {REPLAY, tonumber(first_total), rank, 0, remaining, reset_after, 0, ""}
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
-- The top N changed if the user is in it after this call, or was before. An increase only
-- moves a user up, so one not in it after was not in it before: the position before is
-- read only for a decrease (an operator's adjustment).
local was_in_top = delta < 0 and rcall("ZRANK", leaderboard_key, user_id) < top_n
rcall("ZADD", leaderboard_key, "XX", int(-total), user_id)
local rank = rcall("ZCOUNT", leaderboard_key, "-inf", "(" .. int(-total)) + 1
-- rank - 1 users are strictly ahead: the position is at least that, so only a user ranked
-- within the top N needs it read
local in_top = rank <= top_n and rcall("ZRANK", leaderboard_key, user_id) < top_n
if use_idempotency then
  -- the rank too: a replay answers what the first response said
  rcall("SET", idempotency_key, int(delta) .. ":" .. int(total) .. ":" .. int(rank),
    "EX", int(idempotency_ttl))
  -- the key and the total go to Postgres's ledger: a rebuild restores the record from them
  rcall("XADD", events_key, "*", "e", event_id, "u", user_id, "d", int(delta),
    "k", request_key, "t", int(total))
else
  rcall("XADD", events_key, "*", "e", event_id, "u", user_id, "d", int(delta))
end
local flush = 0
if rcall("SET", flush_key, "1", "NX", "EX", int(flush_ttl)) then flush = 1 end

-- A member of the top N changed score, or someone entered it: publish the new top N.
local top_version = ""
if was_in_top or in_top then
  local top = rcall("ZRANGE", leaderboard_key, 0, top_n - 1, "WITHSCORES")
  top_version = rcall("XADD", top_key, "MAXLEN", "~", int(top_maxlen), "*", unpack(top))
end

return {OK, total, rank, 0, remaining, reset_after, flush, top_version}
