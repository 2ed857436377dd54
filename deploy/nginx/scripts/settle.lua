-- Shared by every Governor enforcement script (prepended by controller/clients/scripts.py).
-- Time is Redis server time only: gateways' clocks may disagree, the server's cannot.
-- These scripts run on every request: they avoid what Lua makes dear inside Redis —
-- building strings and tables, converting numbers, values crossing between Redis and Lua,
-- and redis.call round trips (docs/enforcement.md, "Cost, measured").

-- Globals cost a table lookup each inside Redis: the hot ones are bound to locals once.
local call, floor, ceil, max, min = redis.call, math.floor, math.ceil, math.max, math.min
local sub, format, unpack = string.sub, string.format, unpack
local tonumber, huge = tonumber, math.huge

local DAY_MS = 86400000
local STATE_TTL_MS = 2 * DAY_MS  -- a level's state outlives a day's budget, then goes

-- Numbers read from Redis are strings: arithmetic converts them (`text + 0`) for half of
-- what tonumber() costs (Lua 5.1's converts twice). A number passed to call() reaches
-- Redis formatted with %.17g: exact for a double, but dear; integers go as
-- format('%d', n), which costs half as much. Server time in ms is
-- `t[1] * 1000 + t[2] / 1000` of call('TIME') (written out where used: a function costs
-- a closure per call).

-- A state field as read (`text`; nil: absent, which counts as 0) as a number, or nil when it
-- holds what no script writes: Lua 5.1's tonumber takes 'nan', 'inf' and '1e400' (C's
-- strtod), which compare false both ways and so pass every check, and arithmetic on 'abc'
-- stops the script (a failing store: fail-open plans would be served). `least`: the
-- smallest value that makes sense there. `x - x == 0` is false for nan and both infinities.
local function number_at(text, least)
  local value = tonumber(text or 0)
  if value and value >= least and value - value == 0 then
    return value
  end
  return nil
end

-- Lower a hold counter by `by`. A counter that no longer holds an integer (a hand edit) stays
-- as it is rather than stopping the script halfway, its earlier writes kept (Redis does not
-- undo them): admit.lua refuses naming it until it is repaired.
local function lower(state, field, by)
  redis.pcall('HINCRBY', state, field, by)
end

-- The refusal of a script, before it writes anything, when a key it writes holds another
-- type (a hand edit); nil when none does. Redis keeps what a script wrote before an error, and
-- the gateway repeats a refused settle or charge, which would apply those writes (the credits
-- charged, the usage counted) again each time. `keys`: key, its type, key, its type, …
local function wrong_type(keys)
  for i = 1, #keys, 2 do
    local kind = call('TYPE', keys[i]).ok
    if kind ~= 'none' and kind ~= keys[i + 1] then
      return redis.error_reply(format('WRONGTYPE %s holds a %s, not the %s Governor writes',
        keys[i], kind, keys[i + 1]))
    end
  end
  return nil
end

-- Take `cost` (micro-USD; below 0: a refund, added back) off the balance of `credits`: the
-- balance after it, or the error reply that refuses the whole call when the balance holds
-- no integer (a hand edit), before anything else is written, so that the gateway repeats it
-- once it is repaired.
local function debit(credits, history, cost)
  local balance = redis.pcall('HINCRBY', credits, 'balance', -cost)
  if type(balance) == 'table' and not string.find(balance.err, 'not an integer', 1, true) then
    -- The server refused the write itself (OOM: maxmemory reached), not the balance: its own
    -- error, so the gateway holds the call as a whole-server refusal, naming the real cause.
    return nil, balance
  end
  if type(balance) == 'table' then
    return nil, redis.error_reply(format('%s field balance holds what no script writes (%s): ' ..
      'set it to the last balance_micro_usd of %s (redis-cli XREVRANGE %s + - COUNT 1, then ' ..
      'redis-cli HSET %s balance N)', credits, balance.err, history, history, credits))
  end
  return balance, nil
end

-- A level's state hash (one per level owner: global, ip, tenant, user) holds, for a limit
-- field F (`limit` or `limit@model`):
--   g|F  GCRA theoretical arrival time, ms      l|F  the limit it was computed under
--   c|F  open reservations (concurrency)
--   d|F  UTC day of u|F   u|F  tokens settled that day   v|F  tokens held, not settled
--   x|<id>  a reservation's settle record (tenant level)
--   a    the weight of the owners with requests in flight here (a level whose concurrency
--        is shared by weight: admit.lua's f check)   o|<owner>  that owner's requests in
--        flight here   q|<owner>  the weight it joined with
--   n    when the level next needs care (ms): its earliest lease expiry or the next UTC
--        midnight, whichever is first; kept by levels that can hold something (budgets,
--        concurrency) and by the tenant's (settle records)
--   e    the day the TTL was last pushed out (written by earlier scripts; no longer read)
-- A level with rates only keeps no `n`: its keys' TTL is pushed out when a rate's state
-- passes a UTC midnight (admit.lua).
-- Its lease set (sorted by expiry) holds one member per reservation that holds something
-- there: 'h|<id>|<tokens>|<holds>' (holds: 'b=F' budget, 'c=F' slot, 't=F' no hold,
-- 'o=<owner>' an owner's share, comma-separated), '$|<id>|<micro-USD>' (credits), 'x|<id>'
-- (a settle record's end).

-- Give back an owner's request in flight on a level shared by weight: its last one out
-- takes the weight it joined with from the level's active weight. The subtraction is Lua's
-- (a double, written back with %.17g as admit.lua's addition is): HINCRBYFLOAT's long double
-- would leave `a` a last digit off, and an exact share refused. A value not ours (a hand
-- edit) reads as nothing rather than stopping the sweep halfway.
local function unshare(state, owner)
  local values = call('HMGET', state, 'o|' .. owner, 'a', 'q|' .. owner)
  local left = (tonumber(values[1]) or 0) - 1
  if left > 0 then
    call('HSET', state, 'o|' .. owner, format('%d', left))
    return
  end
  call('HDEL', state, 'o|' .. owner, 'q|' .. owner)
  local active = (tonumber(values[2]) or 0) - (tonumber(values[3]) or 0)
  -- Rounding left over (nobody in flight), or a value not a number: nothing.
  call('HSET', state, 'a', (active >= 1e-9 and active < math.huge) and active or '0')
end

-- A level's care, due once its `n` has come: release up to 64 expired leases (bounded
-- work per call; a backlog drains over the next calls) — a crashed gateway's reservations
-- end here —, push the keys' TTL out and note when care is next due: the earliest lease
-- expiry or `midnight`, whichever is first (so the TTL is pushed at least once a day).
local function housekeep(state, leases, credits, now, midnight)
  local match, gmatch = string.match, string.gmatch
  -- Undo one lease: give back what it held.
  local function release(member)
    local code = sub(member, 1, 1)
    if code == 'h' then
      local tokens, holds = match(member, '^h|[^|]*|([^|]*)|(.*)$')
      for hold in gmatch(holds, '[^,]+') do
        local kind, field = sub(hold, 1, 1), sub(hold, 3)
        if kind == 'b' then
          lower(state, 'v|' .. field, -tokens)
        elseif kind == 'c' then
          lower(state, 'c|' .. field, -1)
        elseif kind == 'o' then
          unshare(state, field)
        end
      end
    elseif code == '$' and credits then
      lower(credits, 'reserved', -match(member, '([^|]*)$'))
    elseif code == 'x' then
      call('HDEL', state, member)
    end
  end

  local expired = call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #expired do
    release(expired[i])
  end
  if #expired > 0 then
    call('ZREM', leases, unpack(expired))
  end
  local next_due = call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  if next_due[2] and next_due[2] + 0 < midnight then
    call('HSET', state, 'n', next_due[2])
  else
    call('HSET', state, 'n', format('%d', midnight))
  end
  call('PEXPIRE', state, STATE_TTL_MS)
  call('PEXPIRE', leases, STATE_TTL_MS)
end

-- Settle one reservation with what the request really used: refund or charge the difference.
--
-- KEYS  1/2 global state/leases  3/4 ip state/leases  5/6 tenant state/leases
--       7/8 user state/leases  9 tenant credits  10 tenant credit history (stream)
-- ARGV  1 reservation id  2 actual tokens  3 actual cost, micro-USD  4 model
--       5 history length kept  6 prompt tokens  7 completion tokens
--       8 '1': the request goes on after its answer (a background Responses answer, generated
--         afterwards): its concurrency holds (c=, o=) stay under their lease, not given back
--         (absent or '': everything is settled); '2': a renewal, nothing settled (ARGV 2-7
--         unread): the holds kept for a background answer still running get a lease of
--         ARGV 9 ms from now, and its settle record ARGV 9 + ARGV 10 ms (never shortened)
-- Returns 1 when the reservation was settled (or renewed), 0 when it was unknown (settled
-- already, or older than its lease plus the record grace; a renewal: nothing kept for it).
--
-- Holds kept so end with their lease's expiry (a sweep, as a crashed gateway's), or with a
-- later settle of the same reservation: the record then lists them alone ('-,0;<level>c=F'),
-- so that settle (ARGV 2 and 3 0: a release) gives back the slots and charges nothing.
-- A read finding the answer still running renews that lease (ARGV 8 '2'), so a polled
-- generation keeps its slots past its admission's lease: a concurrency limit holds for jobs
-- longer than the lease. Every level in one call (on a Cluster: every level of this slot).
--
-- A state field that holds what no script writes (admit.lua refuses naming it) is left as
-- it is: a count added to it would hide the damage or pass for a repair, and an error
-- halfway would keep the writes before it, charging them again when the settle is repeated.

local tonumber, match, gmatch = tonumber, string.match, string.gmatch

-- A daily budget's settled usage, 0 when the UTC day changed since it was last written; nil
-- when its day or count holds what no script writes.
local function used_today(day_text, used_text, today)
  local day = number_at(day_text, 0)
  if day ~= today then
    return day and 0
  end
  return number_at(used_text, 0)
end

local rid, actual = ARGV[1], tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local keep = ARGV[8] == '1'
local renew = ARGV[8] == '2'
local kept = nil  -- the record of the holds kept, when any are
local LEVELS = {g = {KEYS[1], KEYS[2]}, i = {KEYS[3], KEYS[4]}, t = {KEYS[5], KEYS[6]},
  u = {KEYS[7], KEYS[8]}}
local credits = KEYS[9]

local text = call('HGET', KEYS[5], 'x|' .. rid)
if not text then
  return 0
end
-- The record: '<credits held or ->,<tokens held>', then '<level><holds>' per level.
local parts = {}
for part in gmatch(text, '[^;]+') do
  parts[#parts + 1] = part
end
local credit_text, tokens_text = match(parts[1], '^([^,]+),(.+)$')
local credit_held, reserved = tonumber(credit_text), tonumber(tokens_text)
local time = call('TIME')
local now = time[1] * 1000 + time[2] / 1000
local today = floor(now / DAY_MS)

local writes = {KEYS[5], 'hash', KEYS[6], 'zset'}
for i = 2, #parts do
  local level = LEVELS[sub(parts[i], 1, 1)]
  writes[#writes + 1], writes[#writes + 2], writes[#writes + 3], writes[#writes + 4] =
    level[1], 'hash', level[2], 'zset'
end
if credit_held then
  writes[#writes + 1], writes[#writes + 2], writes[#writes + 3], writes[#writes + 4] =
    credits, 'hash', KEYS[10], 'stream'
end
local refused = wrong_type(writes)
if refused then
  return refused
end

if renew then
  -- Only kept holds (a '-,0;' record): a reservation still being answered keeps its lease.
  -- XX: a lease a sweep ended is not made again; GT: a repeat never shortens one.
  if sub(text, 1, 4) ~= '-,0;' then
    return 0
  end
  local expires = format('%d', ceil(now + ARGV[9]))
  for i = 2, #parts do
    local level = LEVELS[sub(parts[i], 1, 1)]
    call('ZADD', level[2], 'XX', 'GT', expires, 'h|' .. rid .. '|0|' .. sub(parts[i], 2))
  end
  call('ZADD', LEVELS.t[2], 'XX', 'GT', format('%d', ceil(now + ARGV[9] + ARGV[10])),
    'x|' .. rid)
  return 1
end

-- The credits first: a balance that is no integer (a hand edit) refuses the whole settle
-- before anything is written, so the gateway repeats it once the balance is repaired.
if credit_held then
  local balance, broken = 0, nil
  if cost > 0 then
    balance, broken = debit(credits, KEYS[10], cost)
    if broken then
      return broken
    end
  end
  if call('ZREM', LEVELS.t[2], '$|' .. rid .. '|' .. credit_text) == 1 then
    lower(credits, 'reserved', -credit_held)
  end
  if cost > 0 then
    call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[5], '*', 'kind', 'charge',
      'amount_micro_usd', -cost, 'balance_micro_usd', balance, 'request', rid,
      'model', ARGV[4], 'tokens', ARGV[2], 'prompt_tokens', ARGV[6],
      'completion_tokens', ARGV[7])
  end
end

for i = 2, #parts do
  local level, holds = sub(parts[i], 1, 1), sub(parts[i], 2)
  local state, leases = LEVELS[level][1], LEVELS[level][2]
  -- Its lease is gone when a sweep released it already: then only the usage counts.
  local member = 'h|' .. rid .. '|' .. tokens_text .. '|' .. holds
  local expires = keep and call('ZSCORE', leases, member)
  local held = call('ZREM', leases, member) == 1
  local slots = nil  -- the concurrency holds kept here
  for hold in gmatch(holds, '[^,]+') do
    local kind, field = sub(hold, 1, 1), sub(hold, 3)
    if keep and (kind == 'c' or kind == 'o') then
      if held then
        slots = slots and slots .. ',' .. hold or hold
      end
    elseif kind == 't' then
      -- Move the GCRA state by the difference: unused tokens flow back, extra ones are
      -- owed, counted in the interval of the limit in force now.
      local cur = call('HMGET', state, 'g|' .. field, 'l|' .. field)
      local tat, limit = number_at(cur[1], -huge), number_at(cur[2], 0)
      if cur[2] and tat and limit and limit > 0 then
        call('HSET', state, 'g|' .. field, max(tat, now) + (actual - reserved) * 60000 / limit)
      end
    elseif kind == 'c' then
      if held then
        lower(state, 'c|' .. field, -1)
      end
    elseif kind == 'o' then
      if held then
        unshare(state, field)
      end
    elseif kind == 'b' then
      if held then
        lower(state, 'v|' .. field, -reserved)
      end
      local day = call('HMGET', state, 'd|' .. field, 'u|' .. field)
      local used = used_today(day[1], day[2], today)
      if used then
        call('HSET', state, 'd|' .. field, today, 'u|' .. field, used + actual)
      end
    end
  end
  if slots then
    -- Under a lease of their own that ends when the admission's did: a response nobody
    -- reads gives its slot back then, as a crashed gateway's request does.
    call('ZADD', leases, expires, 'h|' .. rid .. '|0|' .. slots)
    kept = (kept or '-,0') .. ';' .. level .. slots
  end
end

if kept then
  call('HSET', KEYS[5], 'x|' .. rid, kept)  -- its end (the 'x|' lease) stays as it was
  return 1
end
call('HDEL', KEYS[5], 'x|' .. rid)
call('ZREM', LEVELS.t[2], 'x|' .. rid)
return 1
