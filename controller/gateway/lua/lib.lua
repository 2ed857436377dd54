-- Shared by every Governor enforcement script (prepended by controller/gateway/scripts.py).
-- Time is Redis server time only: gateways' clocks may disagree, the server's cannot.
-- These scripts run on every request: they avoid what Lua makes dear inside Redis —
-- building strings, formatting numbers, growing tables — and redis.call round trips.

-- Globals cost a table lookup each inside Redis: the hot ones are bound to locals once.
local call, tonumber, floor, ceil, max, min = redis.call, tonumber, math.floor, math.ceil,
  math.max, math.min
local sub, match, gmatch, unpack = string.sub, string.match, string.gmatch, unpack

local DAY_MS = 86400000
local STATE_TTL_MS = 2 * DAY_MS  -- a level's state outlives a day's budget, then goes

local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- A number passed to call() reaches Redis formatted with %.17g (exact for a double), so
-- times and counters go to Redis as numbers: formatting them here would only cost more.

-- A level's state hash (one per level owner: global, ip, tenant, user) holds, for a limit
-- field F (`limit` or `limit@model`):
--   g|F  GCRA theoretical arrival time, ms      l|F  the limit it was computed under
--   c|F  open reservations (concurrency)
--   d|F  UTC day of u|F   u|F  tokens settled that day   v|F  tokens held, not settled
--   x|<id>  a reservation's settle record (tenant level)
--   n    the earliest lease expiry (ms; absent: none)   e  when the TTL is next pushed out
-- Its lease set (sorted by expiry) holds one member per reservation that holds something
-- there: 'h|<id>|<tokens>|<holds>' (holds: 'b=F' budget, 'c=F' slot, 't=F' no hold,
-- comma-separated), '$|<id>|<micro-USD>' (credits), 'x|<id>' (a settle record's end).

-- Undo one lease: give back what it held.
local function release(state, credits, member)
  local code = sub(member, 1, 1)
  if code == 'h' then
    local tokens, holds = match(member, '^h|[^|]*|([^|]*)|(.*)$')
    for hold in gmatch(holds, '[^,]+') do
      local kind, field = sub(hold, 1, 1), sub(hold, 3)
      if kind == 'b' then
        call('HINCRBY', state, 'v|' .. field, -tonumber(tokens))
      elseif kind == 'c' then
        call('HINCRBY', state, 'c|' .. field, -1)
      end
    end
  elseif code == '$' and credits then
    call('HINCRBY', credits, 'reserved', -tonumber(match(member, '([^|]*)$')))
  elseif code == 'x' then
    call('HDEL', state, member)
  end
end

-- Release up to 64 expired leases of one level (bounded work per call; a backlog drains
-- over the next calls), then note when the next one is due. A crashed gateway's
-- reservations end here.
local function sweep(state, leases, credits, now)
  local expired = call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #expired do
    release(state, credits, expired[i])
  end
  if #expired > 0 then
    call('ZREM', leases, unpack(expired))
  end
  local next_due = call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  if next_due[2] then
    call('HSET', state, 'n', next_due[2])
  else
    call('HDEL', state, 'n')
  end
end

-- A daily budget's settled usage, 0 when the UTC day changed since it was last written.
local function used_today(day_text, used_text, today)
  if tonumber(day_text or '-1') ~= today then
    return 0
  end
  return tonumber(used_text or '0')
end
