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

-- Admit one request: check every level's limits and reserve its worst-case tokens, atomically.
--
-- The gateway resolves which limits apply (the contract's lookup rule: first hit wins; a
-- plan's value is each tenant's default) from the limit hashes, and keeps that by
-- `<P>:version`, which the controller bumps in the same transaction as every limit it
-- writes. The script checks the version first: when the limits changed since the gateway
-- read them it answers 'stale' and does nothing, and the gateway reads them again and
-- repeats the call. So a limit changed by Governor counts from the next request.
--
-- KEYS  1 <P>:version  2/3 global state/leases  4/5 ip state/leases
--       6/7 tenant state/leases  8/9 user state/leases  10 tenant credits
-- ARGV  1 reservation id  2 tokens (worst case)  3 the version the limits were read under
--       ('' none)  4 lease ms  5 settle-record ms  6 model ('' none)
--       7 the checks, a letter each, by level: global/ip/tenant/user (an absent level
--         empty): s requests_per_second, m requests_per_minute, t tokens_per_minute,
--         d tokens_per_day, c concurrent_requests; upper case: the model's own value
--         (`limit@model`); f: the level's `concurrent_requests` is shared by weight, its
--         value '<headroom> <weight> <owner>' (after the level's c: see step 3). E.g.
--         's/m/mtd/m' or 'cf//m/'. Or 'shed' / 'too_large': the gateway's resolution
--         decided already; only the version is checked.
--       8... each check's limit as stored, in that order; then, when the plan has credits,
--         the credits to hold and the credits floor (micro-USD).
-- Returns {'stale', the current version ('' none)}; or {'corrupt', key, field, what it holds,
-- its repair} when a state field read holds what no script writes (fail closed: nothing is
-- reserved, and the gateway refuses naming it, whatever the plan's fail mode); or 12 values: outcome, denied_by,
-- retry_after_ms, then the tightest requests quota (check, remaining, reset_ms), tokens
-- quota (check, remaining, reset_ms) and budget (check, remaining, resets_at_ms). A check
-- is its number in ARGV 7's order (1: the first), 0 none, -1 the tenant's credits.
-- Numbers are integers (ms rounded up).
--
-- Every call pays for each table and string it makes (and for collecting them later) and
-- for each value that crosses between Redis and Lua: the checks live in one flat array,
-- the plain fields' names are constants, integers go to Redis already formatted.

local KEYS, ARGV = KEYS, ARGV  -- globals cost a table lookup per use
local version = call('GET', KEYS[1])
if (version or '') ~= ARGV[3] then
  return {'stale', version or ''}
end
local letters = ARGV[7]
if letters == 'shed' or letters == 'too_large' then
  return {letters, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end

local byte = string.byte

-- The answer naming a state field that holds what no script writes (not a finite number, a
-- settled count below 0), and how a person repairs it: admission stops there, since the
-- true count is unknown and any guess could serve that traffic with no limit.
local function corrupt(key, field, text)
  local code, name = sub(field, 1, 2), sub(field, 3)
  local fix
  if code == 'u|' or code == 'd|' then
    fix = format("set %s to the tokens settled today (redis-cli HSET %s %s N), or delete the " ..
      "day's count (redis-cli HDEL %s d|%s u|%s): it starts again from 0", 'u|' .. name, key,
      'u|' .. name, key, name, name)
  elseif code == 'g|' or code == 'l|' then
    fix = format("delete the rate's state (redis-cli HDEL %s g|%s l|%s): its window starts " ..
      'again', key, name, name)
  elseif field == 'balance' then
    fix = format('set it to the last balance_micro_usd of %s:history (redis-cli XREVRANGE ' ..
      '%s:history + - COUNT 1, then redis-cli HSET %s balance N)', key, key, key)
  else  -- a hold counter (v|, c|, reserved): below 0 counts as 0, so deleting it is safe
    fix = format('delete it (redis-cli HDEL %s %s): what requests in flight hold is counted ' ..
      'again as they start', key, field)
  end
  return {'corrupt', key, field, sub(text, 1, 80), fix}
end
local rid, tokens_text, model = ARGV[1], ARGV[2], ARGV[6]
local tokens = tokens_text + 0
local credits = KEYS[10]
local TENANT = 3  -- the level always read and written: it keeps the settle record
-- A kind is its letter's byte (lower case; upper case is 32 less).
local RPS, RPM, TPM, TPD, CONCURRENT, FAIR, SLASH = 115, 109, 116, 100, 99, 102, 47

local time = call('TIME')
local now = time[1] * 1000 + time[2] / 1000
local today = floor(now / DAY_MS)
local midnight = (today + 1) * DAY_MS

-- Check j's values sit at c[6j + KIND ...]: its kind, field, the state field its step 4
-- writes (g|, v| or c|), where that field's value sits in its level's read, its limit
-- (number; as stored it is ARGV[7 + j]), and what steps 2 and 3 worked out.
local KIND, FIELD, NAME, AT, LIMIT, VALUE = -5, -4, -3, -2, -1, 0
local c = {false, false, false, false, false, false, false, false, false, false, false, false,
  false, false, false, false, false, false, false, false, false, false, false, false,
  false, false, false, false, false, false, false, false, false, false, false, false}
-- Level l's values sit at lv[5l + READ ...]: its state read (false: not read), its first
-- and last checks, whether this call pushes its keys' TTL out, and where its `n` sits in
-- the read (0: not read).
local READ, FIRST, LAST, REFRESH, DUE = -4, -3, -2, -1, 0
local lv = {false, 1, 0, false, 0, false, 1, 0, false, 0, false, 1, 0, false, 0,
  false, 1, 0, false, 0}

-- 1. Read each level's counters in one call. A level that can hold something (budgets,
-- concurrency: leases), and the tenant's, also reads its `n` (lib.lua): once that has
-- come, expired leases are released and the counters read again.
local names = {false, false, false, false, false, false, false, false, false, false, false,
  false}
local fair = 0  -- the f check, if any (a level's weighted share of its concurrency)
-- Its state as step 3 read it (step 4 writes from it): this owner's requests in flight, the
-- active weight without it, the weight it joined with, and whether stale shares go first.
local share_mine, share_active, share_joined, share_stale = 0, 0, 0, false
local n, p = 0, 1
for l = 1, 4 do
  local o = 5 * l
  local k, cared = 0, l == TENANT
  lv[o + FIRST] = n + 1
  local kind = byte(letters, p)
  while kind and kind ~= SLASH do
    n = n + 1
    local at = 6 * n
    local f, a, b, d
    local value = ARGV[7 + n]
    if kind == RPM then
      f, a, b = 'requests_per_minute', 'g|requests_per_minute', 'l|requests_per_minute'
    elseif kind == TPM then
      f, a, b = 'tokens_per_minute', 'g|tokens_per_minute', 'l|tokens_per_minute'
    elseif kind == TPD then
      f, a, b, d = 'tokens_per_day', 'd|tokens_per_day', 'u|tokens_per_day', 'v|tokens_per_day'
    elseif kind == RPS then
      f, a, b = 'requests_per_second', 'g|requests_per_second', 'l|requests_per_second'
    elseif kind == CONCURRENT then
      f, a = 'concurrent_requests', 'c|concurrent_requests'
    elseif kind == FAIR then
      -- The level's active weight `a`, this owner's requests in flight there `o|<owner>` and
      -- the weight it joined with `q|<owner>`.
      local headroom, weight, owner = string.match(value, '^(%S+) (%S+) (%S+)$')
      f, a, b, d, value = owner, 'a', 'o|' .. owner, weight + 0, headroom
      fair = n
    else  -- upper case: the model's own value (`limit@model`), whose names are built
      kind = kind + 32
      f = (kind == RPM and 'requests_per_minute' or kind == TPM and 'tokens_per_minute'
        or kind == TPD and 'tokens_per_day' or kind == RPS and 'requests_per_second'
        or 'concurrent_requests') .. '@' .. model
      if kind == TPD then
        a, b, d = 'd|' .. f, 'u|' .. f, 'v|' .. f
      elseif kind == CONCURRENT then
        a = 'c|' .. f
      else
        a, b = 'g|' .. f, 'l|' .. f
      end
    end
    if kind == TPD then
      names[k + 1], names[k + 2], names[k + 3] = a, b, d
      k, cared, a = k + 3, true, d
    elseif kind == CONCURRENT then
      names[k + 1] = a
      k, cared = k + 1, true
    elseif kind == FAIR then
      names[k + 1], names[k + 2], names[k + 3] = a, b, 'q|' .. f
      k, cared, a = k + 3, true, d  -- NAME: the weight; AT: `q|` (`o|`, `a` before it)
    else
      names[k + 1], names[k + 2] = a, b
      k = k + 2
    end
    c[at + KIND], c[at + FIELD], c[at + NAME], c[at + AT], c[at + LIMIT] = kind, f, a, k,
      value + 0
    p = p + 1
    kind = byte(letters, p)
  end
  p = p + 1
  lv[o + LAST] = n
  if cared then
    names[k + 1] = 'n'
    k = k + 1
    lv[o + DUE] = k
  end
  if k > 0 then
    local state = KEYS[2 * l]
    local values = call('HMGET', state, unpack(names, 1, k))
    if cared then
      local due = values[k]
      if not due then
        lv[o + REFRESH] = true  -- new state (or no `n` written yet): step 4 notes it
      elseif not ((tonumber(due) or 0) > now) then  -- an `n` not a number: care is due now
        housekeep(state, KEYS[2 * l + 1], l == TENANT and credits or nil, now, midnight)
        values = call('HMGET', state, unpack(names, 1, k))
      end
    end
    lv[o + READ] = values
  end
end
local credit_text = ARGV[8 + n]
local credit_cost = credit_text and credit_text + 0

-- 2. Budgets first: when a budget is spent, waiting a few seconds will not help (402).
local budget, budget_share, budget_left = 0, 0, 0
local fresh = nil  -- budgets whose day changed: their settled count starts again
for l = 1, 4 do
  local o = 5 * l
  for j = lv[o + FIRST], lv[o + LAST] do
    local at = 6 * j
    if c[at + KIND] == TPD then
      local values, a = lv[o + READ], c[at + AT]
      local day = number_at(values[a - 2], 0)
      if not day then
        return corrupt(KEYS[2 * l], 'd|' .. c[at + FIELD], values[a - 2])
      end
      local is_fresh = day ~= today
      -- Settled today: below 0 only by a hand edit (a DECR), which would hand out tokens.
      local used = is_fresh and 0 or number_at(values[a - 1], 0)
      if not used then
        return corrupt(KEYS[2 * l], 'u|' .. c[at + FIELD], values[a - 1])
      end
      local held = number_at(values[a], -huge)
      if not held then
        return corrupt(KEYS[2 * l], c[at + NAME], values[a])
      end
      -- Held: below 0 when releases outran a count deleted or lost; never headroom.
      held = max(held, 0)
      local limit = c[at + LIMIT]
      local remaining = limit - used - held
      if tokens > remaining then
        return {'budget_exhausted', j, ceil(midnight - now), 0, 0, 0, 0, 0, 0, j,
          max(remaining, 0), midnight}
      end
      if is_fresh then
        fresh = fresh or {}
        fresh[j] = true
      end
      c[at + VALUE] = held
      local share = (remaining - tokens) / limit
      if budget == 0 or share < budget_share then
        budget, budget_share, budget_left = j, share, remaining
      end
    end
  end
end
local credit_balance, credit_held = 0, 0
if credit_cost then
  local state = call('HMGET', credits, 'balance', 'reserved')
  credit_balance, credit_held = number_at(state[1], -huge), number_at(state[2], -huge)
  if not credit_balance then
    return corrupt(credits, 'balance', state[1])
  elseif not credit_held then
    return corrupt(credits, 'reserved', state[2])
  end
  credit_held = max(credit_held, 0)  -- as a level's holds: below 0 is never headroom
  local available = credit_balance - credit_held
  if available - credit_cost < ARGV[9 + n] + 0 then
    return {'budget_exhausted', -1, 0, 0, 0, 0, 0, 0, 0, -1, available, 0}
  end
end

-- 3. Rates (GCRA: a limit L per period P lets L through at once, then one per P/L) and
-- concurrency, noting the tightest request and token quotas for the headers. Nothing is
-- written until every check has passed.
local wait_ms, denied = 0, 0
local out = {'allow', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
for l = 1, 4 do
  local o = 5 * l
  local values = lv[o + READ]
  for j = lv[o + FIRST], lv[o + LAST] do
    local at = 6 * j
    local kind = c[at + KIND]
    if kind == CONCURRENT then
      local open = number_at(values[c[at + AT]], -huge)
      if not open then
        return corrupt(KEYS[2 * l], c[at + NAME], values[c[at + AT]])
      end
      open = max(open, 0)  -- as the budgets' holds: below 0 is never headroom
      c[at + VALUE] = open
      local limit = c[at + LIMIT]
      if fair > j and fair <= lv[o + LAST] and c[at + FIELD] == 'concurrent_requests' then
        -- Shared by weight (the level's f check): a tenant within its share of the limit
        -- (weight ÷ the weight of the tenants with requests in flight here, itself
        -- included) may also take the headroom above it (at least one request); one
        -- beyond its share meets the limit itself. So a burst is held at the edge while
        -- the others still get in; a tenant with nothing in flight is always within.
        local f = 6 * fair
        local weight, q = c[f + NAME], c[f + AT]
        local mine = tonumber(values[q - 1]) or 0  -- a value not ours reads as nothing
        local active = tonumber(values[q - 2]) or 0
        local joined = tonumber(values[q]) or weight
        if open <= 0 then
          -- Nobody holds a slot: any share left is stale (a lease given back by a script
          -- that predates sharing, a hand edit): the shares start again from nothing.
          share_stale = mine ~= 0 or active ~= 0
          mine, active = 0, 0
        else
          if not (active >= 0 and active < math.huge) then
            active = 0
          end
          if not (mine >= 0 and mine < math.huge) then
            mine = 0
          end
        end
        if mine > 0 then
          -- Its own weight counts as it is now (step 4 rebases the active weight on it).
          active = max(active - joined, 0)
        end
        share_mine, share_active, share_joined = mine, active, joined
        if mine <= 0 or mine + 1 <= limit * weight / max(active + weight, weight) then
          limit = limit + max(1, limit * c[f + LIMIT])
        end
      end
      if open + 1 > limit and (denied == 0 or wait_ms < 1000) then
        denied, wait_ms = j, 1000  -- when a slot frees is unknown; a second is a polite guess
      end
    elseif kind ~= TPD and kind ~= FAIR then
      local period = kind == RPS and 1000 or 60000
      local a = c[at + AT]
      local interval = period / c[at + LIMIT]
      -- The GCRA state, read under the limit in force. When the limit changed since the
      -- state was written (its `l|` field), the backlog keeps its count of requests (or
      -- tokens) and takes the new interval, so a loosened limit lets traffic through at
      -- once and a tightened one is full at most.
      local stored = number_at(values[a - 1], -huge)
      if not stored then
        return corrupt(KEYS[2 * l], c[at + NAME], values[a - 1])
      end
      local tat = stored
      if tat <= now then
        tat = now
      else
        local old_text = values[a]
        if old_text and old_text ~= ARGV[7 + j] then
          local old_limit = number_at(old_text, 0)
          if not old_limit or old_limit == 0 then  -- 0 would forget the backlog
            return corrupt(KEYS[2 * l], 'l|' .. c[at + FIELD], old_text)
          end
          tat = now + min((tat - now) / (period / old_limit) * interval, period)
        end
      end
      local is_tokens = kind == TPM
      local new_tat = tat + (is_tokens and tokens or 1) * interval
      local after = new_tat
      if new_tat - now > period then
        after = tat
        if denied == 0 or new_tat - now - period > wait_ms then
          denied, wait_ms = j, new_tat - now - period
        end
      end
      c[at + VALUE] = after
      -- A level with rates only (no `n`) pushes its keys' TTL out when a rate's state passes
      -- a UTC midnight: the day's first write, or the one before that carried a backlog
      -- into it.
      if lv[o + DUE] == 0 and (after >= midnight and stored < midnight or
          after >= midnight - DAY_MS and stored < midnight - DAY_MS) then
        lv[o + REFRESH] = true
      end
      local left = floor((period - (after - now)) / interval + 1e-9)
      local slot = is_tokens and 7 or 4
      if out[slot] == 0 or left < out[slot + 1] then
        out[slot], out[slot + 1], out[slot + 2] = j, left, after - now
      end
    end
  end
end
if out[4] ~= 0 then
  out[5], out[6] = max(out[5], 0), ceil(out[6])
end
if out[7] ~= 0 then
  out[8], out[9] = max(out[8], 0), ceil(out[9])
end
if budget ~= 0 then
  out[10], out[11], out[12] = budget, budget_left - (denied ~= 0 and 0 or tokens), midnight
elseif credit_cost then
  out[10], out[11] = -1, credit_balance - credit_held - (denied ~= 0 and 0 or credit_cost)
end
if denied ~= 0 then
  out[1], out[2], out[3] = 'rate_limited', denied, ceil(wait_ms)
  return out
end

-- 4. Commit: advance the rate states, take concurrency slots and hold the tokens under
-- one lease per level, which the first call after its expiry releases. The settle record
-- ('<credits held or ->,<tokens>', then '<level><holds>' per level) outlives the lease by
-- a grace period, so a late settle still charges what was used.
local expires_ms = ceil(now + ARGV[4])
local expires = format('%d', expires_ms)
local record = (credit_text or '-') .. ',' .. tokens_text
local updates = names  -- read already: reused for the writes
local leased = {false, false, false, false, false, false}
for i = 1, 4 do
  local l = i == 3 and 4 or i == 4 and TENANT or i  -- the tenant's record lists every hold
  local o = 5 * l
  local values = lv[o + READ]
  if values then
    local k, holds, holding = 0, nil, false
    for j = lv[o + FIRST], lv[o + LAST] do
      local at = 6 * j
      local kind, hold = c[at + KIND], nil
      if kind == TPD then
        if fresh and fresh[j] then
          local f = c[at + FIELD]
          updates[k + 1], updates[k + 2], updates[k + 3], updates[k + 4] = 'd|' .. f,
            format('%d', today), 'u|' .. f, '0'
          k = k + 4
        end
        updates[k + 1], updates[k + 2] = c[at + NAME], format('%d', c[at + VALUE] + tokens)
        k = k + 2
        hold, holding = 'b=' .. c[at + FIELD], true
      elseif kind == CONCURRENT then
        updates[k + 1], updates[k + 2] = c[at + NAME], format('%d', c[at + VALUE] + 1)
        k = k + 2
        hold, holding = 'c=' .. c[at + FIELD], true
      elseif kind == FAIR then
        local owner, weight = c[at + FIELD], c[at + NAME]
        if share_stale then
          local stale = {}
          for _, name in ipairs(call('HKEYS', KEYS[2 * l])) do
            local code = sub(name, 1, 2)
            if code == 'o|' or code == 'q|' then
              stale[#stale + 1] = name
            end
          end
          if #stale > 0 then
            call('HDEL', KEYS[2 * l], unpack(stale))
          end
        end
        updates[k + 1], updates[k + 2] = 'o|' .. owner, format('%d', max(share_mine, 0) + 1)
        k = k + 2
        -- Its first in flight here, or its weight changed since it joined: the active
        -- weight takes its weight as it is now.
        if share_mine <= 0 or share_joined ~= weight then
          updates[k + 1], updates[k + 2] = 'q|' .. owner, weight
          updates[k + 3], updates[k + 4] = 'a', share_active + weight
          k = k + 4
        end
        hold, holding = 'o=' .. owner, true
      else
        updates[k + 1], updates[k + 2] = c[at + NAME], c[at + VALUE]
        k = k + 2
        if values[c[at + AT]] ~= ARGV[7 + j] then
          updates[k + 1], updates[k + 2] = 'l|' .. c[at + FIELD], ARGV[7 + j]
          k = k + 2
        end
        if kind == TPM then
          hold = 't=' .. c[at + FIELD]
        end
      end
      if hold then
        holds = holds and holds .. ',' .. hold or hold
      end
    end
    if holds then
      record = record .. ';' .. (l == TENANT and 't' or l == 4 and 'u' or l == 2 and 'i' or 'g')
        .. holds
    end
    local m = 0
    if l == TENANT and credit_cost then
      leased[1], leased[2], m = expires, '$|' .. rid .. '|' .. credit_text, 2
    end
    if holding then
      leased[m + 1], leased[m + 2] = expires, 'h|' .. rid .. '|' .. tokens_text .. '|' .. holds
      m = m + 2
    end
    if l == TENANT then
      local record_field = 'x|' .. rid
      updates[k + 1], updates[k + 2] = record_field, record
      leased[m + 1], leased[m + 2] = format('%d', expires_ms + ARGV[5]), record_field
      k, m = k + 2, m + 2
    end
    local due_at = lv[o + DUE]
    if due_at > 0 then
      -- `n`: when care is next due; the leases added now are due at `expires`.
      local due = values[due_at]
      if not due then
        updates[k + 1], updates[k + 2] = 'n', m > 0 and expires_ms < midnight and expires or
          format('%d', midnight)
        k = k + 2
      elseif m > 0 and due + 0 > expires_ms then
        updates[k + 1], updates[k + 2] = 'n', expires
        k = k + 2
      end
    end
    if k > 0 then
      call('HSET', KEYS[2 * l], unpack(updates, 1, k))
    end
    if m > 0 then
      call('ZADD', KEYS[2 * l + 1], unpack(leased, 1, m))
    end
    if lv[o + REFRESH] then
      call('PEXPIRE', KEYS[2 * l], STATE_TTL_MS)
      call('PEXPIRE', KEYS[2 * l + 1], STATE_TTL_MS)
    end
  end
end

if credit_cost then
  call('HSET', credits, 'reserved', format('%d', credit_held + credit_cost))
end
return out
