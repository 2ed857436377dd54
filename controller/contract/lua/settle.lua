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
