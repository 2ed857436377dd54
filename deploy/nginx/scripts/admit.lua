-- Shared by every Governor enforcement script (prepended by controller/gateway/scripts.py).
-- Time is Redis server time only: gateways' clocks may disagree, the server's cannot.
-- These scripts run on every request: they avoid what Lua makes dear inside Redis —
-- building strings, formatting numbers, growing tables — and redis.call round trips.

local DAY_MS = 86400000
local STATE_TTL_MS = 2 * DAY_MS  -- a level's state outlives a day's budget, then goes

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- Lua's tostring keeps 14 digits: a millisecond time would lose its fraction (or come back
-- in exponent form), so a number that is stored goes through here.
local function num(x)
  return string.format('%.17g', x)
end

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
  local code = string.sub(member, 1, 1)
  if code == 'h' then
    local tokens, holds = string.match(member, '^h|[^|]*|([^|]*)|(.*)$')
    for hold in string.gmatch(holds, '[^,]+') do
      local kind, field = string.sub(hold, 1, 1), string.sub(hold, 3)
      if kind == 'b' then
        redis.call('HINCRBY', state, 'v|' .. field, -tonumber(tokens))
      elseif kind == 'c' then
        redis.call('HINCRBY', state, 'c|' .. field, -1)
      end
    end
  elseif code == '$' and credits then
    redis.call('HINCRBY', credits, 'reserved', -tonumber(string.match(member, '([^|]*)$')))
  elseif code == 'x' then
    redis.call('HDEL', state, member)
  end
end

-- Release up to 64 expired leases of one level (bounded work per call; a backlog drains
-- over the next calls), then note when the next one is due. A crashed gateway's
-- reservations end here.
local function sweep(state, leases, credits, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, member in ipairs(expired) do
    release(state, credits, member)
  end
  if #expired > 0 then
    redis.call('ZREM', leases, unpack(expired))
  end
  local next_due = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  if next_due[2] then
    redis.call('HSET', state, 'n', next_due[2])
  else
    redis.call('HDEL', state, 'n')
  end
end

-- A daily budget's settled usage, 0 when the UTC day changed since it was last written.
local function used_today(day_text, used_text, today)
  if tonumber(day_text or '-1') ~= today then
    return 0
  end
  return tonumber(used_text or '0')
end

-- A GCRA state read under the limit in force. When the limit changed since the state was
-- written (`old_limit`), the backlog keeps its count of requests (or tokens) and takes the
-- new interval, so a loosened limit lets traffic through at once and a tightened one is
-- full at most.
local function current_tat(tat_text, old_limit, limit_text, interval, now, period)
  local tat = tonumber(tat_text or '0')
  if tat <= now then
    return now
  end
  if old_limit and old_limit ~= limit_text then
    local old = period / tonumber(old_limit)
    return now + math.min((tat - now) / old * interval, period)
  end
  return tat
end

-- Admit one request: check every level's limits and reserve its worst-case tokens, atomically.
--
-- KEYS  1 global limits  2 ip limits  3 plan limits  4 tenant limits  5 user limits
--       6/7 global state/leases  8/9 ip state/leases  10/11 tenant state/leases
--       12/13 user state/leases  14 tenant credits
-- ARGV  1 reservation id  2 tokens (worst case)  3 model ('' none)  4 tenant  5 plan
--       6 user ('' none)  7 '1' if the request has a client ip  8 lease ms
--       9 settle-record ms  10 credits to hold, micro-USD ('' when the plan has no
--       credits)  11 credits floor, micro-USD
-- Returns 19 values: outcome, denied_by, retry_after_ms, then three groups of five —
-- requests quota, tokens quota (address, limit, remaining, reset_ms, window_ms) and budget
-- (address, kind, limit, remaining, resets_at_ms) — then the reservation id. Numbers are
-- integers (ms rounded up); limits are returned as stored; '' stands for none.

local rid, tokens_text, model = ARGV[1], ARGV[2], ARGV[3]
local tokens = tonumber(tokens_text)
local tenant, user = ARGV[4], ARGV[6]
local credit_cost = tonumber(ARGV[10])
local credits = KEYS[14]

-- How each limit is enforced: a GCRA period in ms, or 'b'udget, 'c'oncurrency, 'm'ax.
local KINDS = {'requests_per_second', 'requests_per_minute', 'tokens_per_minute',
  'tokens_per_day', 'concurrent_requests', 'max_tokens_per_request'}
local HOW = {requests_per_second = 1000, requests_per_minute = 60000,
  tokens_per_minute = 60000, tokens_per_day = 'b', concurrent_requests = 'c',
  max_tokens_per_request = 'm'}

-- Every level that applies, with the limit hashes it reads in lookup order (the tenant
-- level falls back to the plan's values: a plan limit is each tenant's default). Its
-- checks are checks[first..last].
local tenant_owner = 'tenant/' .. tenant .. '/'
local levels = {{id = 'g', owner = 'global/', h1 = KEYS[1], h2 = false, state = KEYS[6],
  leases = KEYS[7], first = 1, last = 0, holds = false, values = false, names = false}}
if ARGV[7] == '1' then
  levels[2] = {id = 'i', owner = 'ip/', h1 = KEYS[2], h2 = false, state = KEYS[8],
    leases = KEYS[9], first = 1, last = 0, holds = false, values = false, names = false}
end
local tenant_level = {id = 't', owner = tenant_owner, h1 = KEYS[4], h2 = KEYS[3],
  state = KEYS[10], leases = KEYS[11], first = 1, last = 0, holds = false, values = false,
  names = false}
levels[#levels + 1] = tenant_level
if user ~= '' then
  levels[#levels + 1] = {id = 'u', owner = 'user/' .. tenant .. '/' .. user .. '/',
    h1 = KEYS[5], h2 = false, state = KEYS[12], leases = KEYS[13], first = 1, last = 0,
    holds = false, values = false, names = false}
end

-- The fields to read: `limit@model` before `limit` (the contract's lookup rule).
local fields, kind_of = KINDS, KINDS
if model ~= '' then
  fields, kind_of = {}, {}
  for _, kind in ipairs(KINDS) do
    fields[#fields + 1], kind_of[#fields + 1] = kind .. '@' .. model, kind
    fields[#fields + 1], kind_of[#fields + 1] = kind, kind
  end
end
local n_fields = #fields

local function answer(outcome, denied_by)
  return {outcome, denied_by, 0, '', '', '', '', '', '', '', '', '', '', '', '', '', '', '',
    ''}
end

-- 1. Read every limit. A 0 anywhere is the controller shedding that traffic.
local checks, n, found = {}, 0, {}  -- found: kind → the level that has a value for it
for _, lv in ipairs(levels) do
  lv.first = n + 1
  for h = 1, lv.h2 and 2 or 1 do
    local values = redis.call('HMGET', h == 1 and lv.h1 or lv.h2, unpack(fields))
    for i = 1, n_fields do
      local text = values[i]
      if text then
        local value = tonumber(text)
        if value == 0 then
          return answer('shed', (h == 2 and 'plan/' .. ARGV[5] .. '/' or lv.owner) .. fields[i])
        end
        local kind = kind_of[i]
        -- Anything but a number >= 0 was not written by Governor: it is ignored.
        if value and value > 0 and found[kind] ~= lv then
          found[kind] = lv
          local how = HOW[kind]
          if tokens > value and (how == 'm' or kind == 'tokens_per_minute') then
            return answer('too_large', lv.owner .. fields[i])  -- it can never fit
          end
          if how ~= 'm' then
            n = n + 1
            checks[n] = {lv = lv, kind = kind, how = how, field = fields[i], limit = value,
              text = text, at = 0, after = false, interval = 0, count = 0, held = 0,
              fresh = false}
            lv.holds = lv.holds or how == 'b' or how == 'c'
          end
        end
      end
    end
  end
  lv.last = n
end

-- 2. Read each level's counters in one call; release expired leases first where one is
-- due (the state notes when the next one is), then read again.
local now = now_ms()
local today = math.floor(now / DAY_MS)
local resets_at = (today + 1) * DAY_MS
for _, lv in ipairs(levels) do
  if lv.last >= lv.first or lv == tenant_level then
    local names, k = {'e', 'n'}, 2
    for i = lv.first, lv.last do
      local c = checks[i]
      local f = c.field
      if c.how == 'b' then
        names[k + 1], names[k + 2], names[k + 3] = 'd|' .. f, 'u|' .. f, 'v|' .. f
        k = k + 3
      elseif c.how == 'c' then
        names[k + 1] = 'c|' .. f
        k = k + 1
      else
        names[k + 1], names[k + 2] = 'g|' .. f, 'l|' .. f
        k = k + 2
      end
      c.at = k  -- where this check's last state value sits
    end
    local values = redis.call('HMGET', lv.state, unpack(names))
    if values[2] and tonumber(values[2]) <= now then
      sweep(lv.state, lv.leases, lv == tenant_level and credits or nil, now)
      values = redis.call('HMGET', lv.state, unpack(names))
    end
    lv.values, lv.names = values, names
  end
end

-- 3. Budgets first: when a budget is spent, waiting a few seconds will not help (402).
local budget, budget_share
for i = 1, n do
  local c = checks[i]
  if c.how == 'b' then
    local values = c.lv.values
    c.fresh = tonumber(values[c.at - 2] or '-1') ~= today
    c.count = c.fresh and 0 or tonumber(values[c.at - 1] or '0')  -- settled today
    c.held = tonumber(values[c.at] or '0')
    local remaining = c.limit - c.count - c.held
    if tokens > remaining then
      local address = c.lv.owner .. c.field
      return {'budget_exhausted', address, math.ceil(resets_at - now), '', '', '', '', '',
        '', '', '', '', '', address, 'tokens', c.text, math.max(remaining, 0), resets_at, ''}
    end
    local share = (remaining - tokens) / c.limit
    if budget == nil or share < budget_share then
      budget, budget_share = c, share
    end
  end
end
local credit_balance, credit_held = 0, 0
if credit_cost then
  local state = redis.call('HMGET', credits, 'balance', 'reserved')
  credit_balance, credit_held = tonumber(state[1] or '0'), tonumber(state[2] or '0')
  local available = credit_balance - credit_held
  if available - credit_cost < tonumber(ARGV[11]) then
    return {'budget_exhausted', 'credits/' .. tenant, 0, '', '', '', '', '', '', '', '', '',
      '', 'credits/' .. tenant, 'credits', '', available, '', ''}
  end
end

-- 4. Rates (GCRA: a limit L per period P lets L through at once, then one per P/L) and
-- concurrency, noting the tightest request and token quotas for the headers. Nothing is
-- written until every check has passed.
local wait_ms, denied = 0, nil
local best_requests, best_tokens, left_requests, left_tokens = nil, nil, 0, 0
for i = 1, n do
  local c = checks[i]
  local how, values = c.how, c.lv.values
  if how == 'c' then
    c.count = tonumber(values[c.at] or '0')  -- open now
    if c.count + 1 > c.limit and (denied == nil or wait_ms < 1000) then
      denied, wait_ms = c, 1000  -- when a slot frees is unknown; a second is a polite guess
    end
  elseif how ~= 'b' then
    local interval = how / c.limit
    local tat = current_tat(values[c.at - 1], values[c.at], c.text, interval, now, how)
    local is_tokens = c.kind == 'tokens_per_minute'
    local new_tat = tat + (is_tokens and tokens or 1) * interval
    c.interval = interval
    if new_tat - now > how then
      c.after = tat
      if denied == nil or new_tat - now - how > wait_ms then
        denied, wait_ms = c, new_tat - now - how
      end
    else
      c.after = new_tat
    end
    local left = math.floor((how - (c.after - now)) / interval + 1e-9)
    if is_tokens then
      if best_tokens == nil or left < left_tokens then
        best_tokens, left_tokens = c, left
      end
    elseif best_requests == nil or left < left_requests then
      best_requests, left_requests = c, left
    end
  end
end

local out = {'allow', '', 0, '', '', '', '', '', '', '', '', '', '', '', '', '', '', '', rid}
if best_requests then
  local c = best_requests
  out[4], out[5], out[6] = c.lv.owner .. c.field, c.text, math.max(left_requests, 0)
  out[7], out[8] = math.ceil(c.after - now), c.how
end
if best_tokens then
  local c = best_tokens
  out[9], out[10], out[11] = c.lv.owner .. c.field, c.text, math.max(left_tokens, 0)
  out[12], out[13] = math.ceil(c.after - now), c.how
end
if budget then
  out[14], out[15], out[16] = budget.lv.owner .. budget.field, 'tokens', budget.text
  out[17] = budget.limit - budget.count - budget.held - (denied and 0 or tokens)
  out[18] = resets_at
elseif credit_cost then
  out[14], out[15] = 'credits/' .. tenant, 'credits'
  out[17] = credit_balance - credit_held - (denied and 0 or credit_cost)
end
if denied then
  out[1], out[2], out[3], out[19] = 'rate_limited', denied.lv.owner .. denied.field,
    math.ceil(wait_ms), ''
  return out
end

-- 5. Commit: advance the rate states, take concurrency slots and hold the tokens under
-- one lease per level, which the first call after its expiry releases. The settle record
-- ('<credits held or ->,<tokens>', then '<level><holds>' per level) outlives the lease by
-- a grace period, so a late settle still charges what was used.
-- Lease scores go to ZADD as numbers: Redis turns them into the same double that a
-- formatted string would give, and formatting one in Lua costs ~0.3 µs. Only `n`, a hash
-- field, is stored as text, so only it goes through num().
local expires = now + tonumber(ARGV[8])
local today_text = tostring(today)
local record = (credit_cost and ARGV[10] or '-') .. ',' .. tokens_text
local function commit(lv)
  local values, names = lv.values, lv.names  -- names: the state fields read in step 2
  local updates, k, holds = {}, 0, nil
  for i = lv.first, lv.last do
    local c = checks[i]
    local at, hold = c.at, nil
    if c.how == 'b' then
      if c.fresh then
        updates[k + 1], updates[k + 2], updates[k + 3], updates[k + 4] = names[at - 2], today,
          names[at - 1], 0
        k = k + 4
      end
      updates[k + 1], updates[k + 2] = names[at], c.held + tokens
      k = k + 2
      hold = 'b=' .. c.field
    elseif c.how == 'c' then
      updates[k + 1], updates[k + 2] = names[at], c.count + 1
      k = k + 2
      hold = 'c=' .. c.field
    else
      updates[k + 1], updates[k + 2] = names[at - 1], num(c.after)
      k = k + 2
      if values[at] ~= c.text then
        updates[k + 1], updates[k + 2] = names[at], c.text
        k = k + 2
      end
      if c.kind == 'tokens_per_minute' then
        hold = 't=' .. c.field
      end
    end
    if hold then
      holds = holds and holds .. ',' .. hold or hold
    end
  end
  if holds then
    record = record .. ';' .. lv.id .. holds
  end
  local leased, m = nil, 0
  if lv.holds or lv == tenant_level then
    leased = {}
    if lv == tenant_level and credit_cost then
      leased[1], leased[2], m = expires, '$|' .. rid .. '|' .. ARGV[10], 2
    end
    if lv.holds then
      leased[m + 1], leased[m + 2] = expires, 'h|' .. rid .. '|' .. tokens_text .. '|' .. holds
      m = m + 2
    end
    if lv == tenant_level then
      local record_field = 'x|' .. rid
      updates[k + 1], updates[k + 2] = record_field, record
      k = k + 2
      leased[m + 1], leased[m + 2] = expires + tonumber(ARGV[9]), record_field
      m = m + 2
    end
    -- The first lease is the earliest: note it unless an earlier one is due already.
    if not (values[2] and tonumber(values[2]) <= expires) then
      updates[k + 1], updates[k + 2] = 'n', num(leased[1])
      k = k + 2
    end
  end
  -- Push the keys' TTL out once a day ('e' holds the day it was last pushed), not per call.
  local refresh = values[1] ~= today_text
  if refresh then
    updates[k + 1], updates[k + 2] = 'e', today_text
  end
  redis.call('HSET', lv.state, unpack(updates))
  if m > 0 then
    redis.call('ZADD', lv.leases, unpack(leased))
  end
  if refresh then
    redis.call('PEXPIRE', lv.state, STATE_TTL_MS)
    redis.call('PEXPIRE', lv.leases, STATE_TTL_MS)
  end
end

if credit_cost then
  redis.call('HSET', credits, 'reserved', credit_held + credit_cost)
end
-- The tenant level goes last: its settle record lists the holds of every level.
for _, lv in ipairs(levels) do
  if lv ~= tenant_level and lv.values then
    commit(lv)
  end
end
commit(tenant_level)

return out
