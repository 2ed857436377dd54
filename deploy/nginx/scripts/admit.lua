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
--
-- Every call pays for each table and string it makes (and for collecting them later), so
-- levels and checks are small arrays read through the named indexes below.

local rid, tokens_text, model = ARGV[1], ARGV[2], ARGV[3]
local tokens = tonumber(tokens_text)
local tenant, user = ARGV[4], ARGV[6]
local credit_cost = tonumber(ARGV[10])
local credits = KEYS[14]

-- The limit kinds, and how each is enforced: a GCRA period in ms, or 'b'udget,
-- 'c'oncurrency, 'm'ax. TOKEN_RATE is the one rate counted in tokens.
local KINDS = {'requests_per_second', 'requests_per_minute', 'tokens_per_minute',
  'tokens_per_day', 'concurrent_requests', 'max_tokens_per_request'}
local HOW = {1000, 60000, 60000, 'b', 'c', 'm'}
local TOKEN_RATE = 3

-- A level: id, owner (address prefix), its limit hashes in lookup order (the tenant level
-- falls back to the plan's values: a plan limit is each tenant's default), state and lease
-- keys, its checks (checks[first..last]), whether it holds anything, and the state read.
local ID, OWNER, H1, H2, STATE, LEASES, FIRST, LAST, HOLDS, VALUES, NAMES =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
-- A check: its level, kind (index in KINDS), how, field, limit (number and as stored),
-- where its last state value sits in the level's read, and what step 3/4 worked out.
local LEVEL, KIND, HOW_, FIELD, LIMIT, TEXT, AT, AFTER, COUNT, HELD, FRESH =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11

local tenant_level = {'t', 'tenant/' .. tenant .. '/', KEYS[4], KEYS[3], KEYS[10], KEYS[11],
  1, 0, false, false, false}
local levels = {{'g', 'global/', KEYS[1], false, KEYS[6], KEYS[7], 1, 0, false, false, false},
  false, false, false}
local n_levels = 1
if ARGV[7] == '1' then
  n_levels = 2
  levels[2] = {'i', 'ip/', KEYS[2], false, KEYS[8], KEYS[9], 1, 0, false, false, false}
end
n_levels = n_levels + 1
levels[n_levels] = tenant_level
if user ~= '' then
  n_levels = n_levels + 1
  levels[n_levels] = {'u', 'user/' .. tenant .. '/' .. user .. '/', KEYS[5], false,
    KEYS[12], KEYS[13], 1, 0, false, false, false}
end

-- The fields that apply, in lookup order: `limit@model` before `limit` (the contract's
-- rule), and each one's place in that order.
local fields, kind_of, position = KINDS, {1, 2, 3, 4, 5, 6}, {requests_per_second = 1,
  requests_per_minute = 2, tokens_per_minute = 3, tokens_per_day = 4, concurrent_requests = 5,
  max_tokens_per_request = 6}
if model ~= '' then
  fields, kind_of, position = {}, {}, {}
  for k = 1, 6 do
    local scoped, kind = KINDS[k] .. '@' .. model, KINDS[k]
    fields[2 * k - 1], fields[2 * k] = scoped, kind
    kind_of[2 * k - 1], kind_of[2 * k] = k, k
    position[scoped], position[kind] = 2 * k - 1, 2 * k
  end
end
local n_fields = #fields

local function answer(outcome, denied_by)
  return {outcome, denied_by, 0, '', '', '', '', '', '', '', '', '', '', '', '', '', '', '',
    ''}
end

-- 1. Read every limit. A 0 anywhere is the controller shedding that traffic.
-- Tables are made at their final size where it is known: growing one costs a resize.
local checks, n, found = {false, false, false, false, false, false, false, false}, 0,
  {false, false, false, false, false, false}
for l = 1, n_levels do
  local lv = levels[l]
  lv[FIRST] = n + 1
  for h = H1, lv[H2] and H2 or H1 do
    -- HGETALL answers only the fields a hash has (a limit hash holds a few): cheaper
    -- than asking for every field that could apply and getting mostly nils back.
    local all = call('HGETALL', lv[h])
    local values = model == '' and {false, false, false, false, false, false} or
      {false, false, false, false, false, false, false, false, false, false, false, false}
    for j = 1, #all, 2 do
      local i = position[all[j]]
      if i then
        values[i] = all[j + 1]
      end
    end
    for i = 1, #all > 0 and n_fields or 0 do
      local text = values[i]
      if text then
        local value = tonumber(text)
        if value == 0 then
          return answer('shed', (h == H2 and 'plan/' .. ARGV[5] .. '/' or lv[OWNER]) .. fields[i])
        end
        local kind = kind_of[i]
        -- Anything but a number >= 0 was not written by Governor: it is ignored.
        if value and value > 0 and found[kind] ~= l then
          found[kind] = l
          local how = HOW[kind]
          if tokens > value and (how == 'm' or kind == TOKEN_RATE) then
            return answer('too_large', lv[OWNER] .. fields[i])  -- it can never fit
          end
          if how ~= 'm' then
            n = n + 1
            checks[n] = {lv, kind, how, fields[i], value, text, 0, false, 0, 0, false}
            if how == 'b' or how == 'c' then
              lv[HOLDS] = true
            end
          end
        end
      end
    end
  end
  lv[LAST] = n
end

-- 2. Read each level's counters in one call; release expired leases first where one is
-- due (the state notes when the next one is), then read again.
local now = now_ms()
local today = floor(now / DAY_MS)
local resets_at = (today + 1) * DAY_MS
for l = 1, n_levels do
  local lv = levels[l]
  if lv[LAST] >= lv[FIRST] or lv == tenant_level then
    local names, k = {'e', 'n', false, false, false, false, false, false, false, false}, 2
    for i = lv[FIRST], lv[LAST] do
      local c = checks[i]
      local f, how = c[FIELD], c[HOW_]
      if how == 'b' then
        names[k + 1], names[k + 2], names[k + 3] = 'd|' .. f, 'u|' .. f, 'v|' .. f
        k = k + 3
      elseif how == 'c' then
        names[k + 1] = 'c|' .. f
        k = k + 1
      else
        names[k + 1], names[k + 2] = 'g|' .. f, 'l|' .. f
        k = k + 2
      end
      c[AT] = k
    end
    local values = call('HMGET', lv[STATE], unpack(names, 1, k))
    if values[2] and tonumber(values[2]) <= now then
      sweep(lv[STATE], lv[LEASES], lv == tenant_level and credits or nil, now)
      values = call('HMGET', lv[STATE], unpack(names, 1, k))
    end
    lv[VALUES], lv[NAMES] = values, names
  end
end

-- 3. Budgets first: when a budget is spent, waiting a few seconds will not help (402).
local budget, budget_share
for i = 1, n do
  local c = checks[i]
  if c[HOW_] == 'b' then
    local values, at = c[LEVEL][VALUES], c[AT]
    local fresh = tonumber(values[at - 2] or '-1') ~= today
    local count = fresh and 0 or tonumber(values[at - 1] or '0')  -- settled today
    local held = tonumber(values[at] or '0')
    c[FRESH], c[COUNT], c[HELD] = fresh, count, held
    local limit = c[LIMIT]
    local remaining = limit - count - held
    if tokens > remaining then
      local address = c[LEVEL][OWNER] .. c[FIELD]
      return {'budget_exhausted', address, ceil(resets_at - now), '', '', '', '', '', '', '',
        '', '', '', address, 'tokens', c[TEXT], max(remaining, 0), resets_at, ''}
    end
    local share = (remaining - tokens) / limit
    if budget == nil or share < budget_share then
      budget, budget_share = c, share
    end
  end
end
local credit_balance, credit_held = 0, 0
if credit_cost then
  local state = call('HMGET', credits, 'balance', 'reserved')
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
  local how, values, at = c[HOW_], c[LEVEL][VALUES], c[AT]
  if how == 'c' then
    local count = tonumber(values[at] or '0')  -- open now
    c[COUNT] = count
    if count + 1 > c[LIMIT] and (denied == nil or wait_ms < 1000) then
      denied, wait_ms = c, 1000  -- when a slot frees is unknown; a second is a polite guess
    end
  elseif how ~= 'b' then
    local interval = how / c[LIMIT]
    -- The GCRA state, read under the limit in force. When the limit changed since the
    -- state was written (its `l|` field), the backlog keeps its count of requests (or
    -- tokens) and takes the new interval, so a loosened limit lets traffic through at
    -- once and a tightened one is full at most.
    local tat = tonumber(values[at - 1] or '0')
    if tat <= now then
      tat = now
    else
      local old_limit = values[at]
      if old_limit and old_limit ~= c[TEXT] then
        tat = now + min((tat - now) / (how / tonumber(old_limit)) * interval, how)
      end
    end
    local is_tokens = c[KIND] == TOKEN_RATE
    local new_tat = tat + (is_tokens and tokens or 1) * interval
    local after = new_tat
    if new_tat - now > how then
      after = tat
      if denied == nil or new_tat - now - how > wait_ms then
        denied, wait_ms = c, new_tat - now - how
      end
    end
    c[AFTER] = after
    local left = floor((how - (after - now)) / interval + 1e-9)
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
  out[4], out[5], out[6] = c[LEVEL][OWNER] .. c[FIELD], c[TEXT], max(left_requests, 0)
  out[7], out[8] = ceil(c[AFTER] - now), c[HOW_]
end
if best_tokens then
  local c = best_tokens
  out[9], out[10], out[11] = c[LEVEL][OWNER] .. c[FIELD], c[TEXT], max(left_tokens, 0)
  out[12], out[13] = ceil(c[AFTER] - now), c[HOW_]
end
if budget then
  out[14], out[15], out[16] = budget[LEVEL][OWNER] .. budget[FIELD], 'tokens', budget[TEXT]
  out[17] = budget[LIMIT] - budget[COUNT] - budget[HELD] - (denied and 0 or tokens)
  out[18] = resets_at
elseif credit_cost then
  out[14], out[15] = 'credits/' .. tenant, 'credits'
  out[17] = credit_balance - credit_held - (denied and 0 or credit_cost)
end
if denied then
  out[1], out[2], out[3], out[19] = 'rate_limited', denied[LEVEL][OWNER] .. denied[FIELD],
    ceil(wait_ms), ''
  return out
end

-- 5. Commit: advance the rate states, take concurrency slots and hold the tokens under
-- one lease per level, which the first call after its expiry releases. The settle record
-- ('<credits held or ->,<tokens>', then '<level><holds>' per level) outlives the lease by
-- a grace period, so a late settle still charges what was used.
local expires = now + tonumber(ARGV[8])
local today_text = tostring(today)
local record = (credit_cost and ARGV[10] or '-') .. ',' .. tokens_text
local function commit(lv)
  local values, names = lv[VALUES], lv[NAMES]  -- names: the state fields read in step 2
  local updates, k, holds = {false, false, false, false, false, false, false, false, false,
    false, false, false}, 0, nil
  for i = lv[FIRST], lv[LAST] do
    local c = checks[i]
    local at, how, hold = c[AT], c[HOW_], nil
    if how == 'b' then
      if c[FRESH] then
        updates[k + 1], updates[k + 2], updates[k + 3], updates[k + 4] = names[at - 2], today,
          names[at - 1], 0
        k = k + 4
      end
      updates[k + 1], updates[k + 2] = names[at], c[HELD] + tokens
      k = k + 2
      hold = 'b=' .. c[FIELD]
    elseif how == 'c' then
      updates[k + 1], updates[k + 2] = names[at], c[COUNT] + 1
      k = k + 2
      hold = 'c=' .. c[FIELD]
    else
      updates[k + 1], updates[k + 2] = names[at - 1], c[AFTER]
      k = k + 2
      if values[at] ~= c[TEXT] then
        updates[k + 1], updates[k + 2] = names[at], c[TEXT]
        k = k + 2
      end
      if c[KIND] == TOKEN_RATE then
        hold = 't=' .. c[FIELD]
      end
    end
    if hold then
      holds = holds and holds .. ',' .. hold or hold
    end
  end
  if holds then
    record = record .. ';' .. lv[ID] .. holds
  end
  local leased, m = nil, 0
  if lv[HOLDS] or lv == tenant_level then
    leased = {false, false, false, false, false, false}
    if lv == tenant_level and credit_cost then
      leased[1], leased[2], m = expires, '$|' .. rid .. '|' .. ARGV[10], 2
    end
    if lv[HOLDS] then
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
      updates[k + 1], updates[k + 2] = 'n', leased[1]
      k = k + 2
    end
  end
  -- Push the keys' TTL out once a day ('e' holds the day it was last pushed), not per call.
  local refresh = values[1] ~= today_text
  if refresh then
    updates[k + 1], updates[k + 2] = 'e', today_text
    k = k + 2
  end
  call('HSET', lv[STATE], unpack(updates, 1, k))
  if m > 0 then
    call('ZADD', lv[LEASES], unpack(leased, 1, m))
  end
  if refresh then
    call('PEXPIRE', lv[STATE], STATE_TTL_MS)
    call('PEXPIRE', lv[LEASES], STATE_TTL_MS)
  end
end

if credit_cost then
  call('HSET', credits, 'reserved', credit_held + credit_cost)
end
-- The tenant level goes last: its settle record lists the holds of every level.
for l = 1, n_levels do
  local lv = levels[l]
  if lv ~= tenant_level and lv[VALUES] then
    commit(lv)
  end
end
commit(tenant_level)

return out
