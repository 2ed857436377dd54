-- Charge what a request used that was served without a reservation: a fail-open plan's
-- request while Redis was away, charged once Redis answers. Daily token budgets and credits
-- are charged as settle.lua charges them (rates are not: their windows have passed).
-- Also corrects a charge made before the usage was known (a background Responses answer,
-- settled at its whole reservation): tokens and cost are then the difference, and may be
-- below 0 (a refund).
--
-- KEYS  1 global state  2 ip state  3 tenant state  4 user state (absent levels: the
--       tenant's, never touched)  5 tenant credits  6 tenant credit history (stream)
--       7 the request's charge record (in the slot of the call's own keys)
-- ARGV  1 request id  2 tokens (< 0: given back)  3 cost, micro-USD (< 0: refunded; '' when
--       the plan has no credits)  4 model  5 history length kept  6 prompt tokens
--       7 completion tokens  8 how long the charge record is kept, ms
--       9 the history entry's reason  10 the UTC day (days since the epoch) the tokens given
--       back were charged on ('' for a charge)
--       11.. the daily token budgets in force: '<level 1-4><field>', e.g. '3tokens_per_day'
-- Returns the number of budgets charged (0 when the request was charged already).
--
-- A gateway repeats a charge whose answer it did not get (a timeout), and a stalled Redis may
-- have run it all the same: the charge record, written with the charge, makes the repeat a
-- no-op, as a settle record does for settle.lua.

local tonumber = tonumber
if call('EXISTS', KEYS[7]) == 1 then
  return 0
end
local tokens, cost = ARGV[2] + 0, tonumber(ARGV[3])
local t = call('TIME')
local today = floor((t[1] * 1000 + t[2] / 1000) / DAY_MS)
-- Tokens are given back only to a budget still counting the day they were charged on: a
-- budget that reset since holds none of them (and must never go below 0).
local giving_back = tokens < 0
if giving_back and tonumber(ARGV[10]) ~= today then
  tokens = 0
end

local writes = {}
if cost and cost ~= 0 then
  writes = {KEYS[5], 'hash', KEYS[6], 'stream'}
end
for i = 11, #ARGV do
  writes[#writes + 1], writes[#writes + 2] = KEYS[sub(ARGV[i], 1, 1) + 0], 'hash'
end
local refused = wrong_type(writes)
if refused then
  return refused
end

-- The credits first: a balance that is no integer (a hand edit) refuses the whole charge
-- before anything is written (settle.lua's reason), and the gateway holds it for later.
-- A refund is a debit of less than 0 (HINCRBY adds it back).
if cost and cost ~= 0 then
  local balance, broken = debit(KEYS[5], KEYS[6], cost)
  if broken then
    return broken
  end
  call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'kind', cost > 0 and 'charge' or 'refund',
    'amount_micro_usd', -cost, 'balance_micro_usd', balance, 'request', ARGV[1],
    'model', ARGV[4], 'tokens', ARGV[2], 'prompt_tokens', ARGV[6],
    'completion_tokens', ARGV[7], 'reason', ARGV[9])
end

-- A day or count that holds what no script writes is left as it is (settle.lua's reason):
-- admit.lua refuses naming it. Such a budget is not counted as charged.
local charged = 0
for i = 11, #ARGV do
  local state, field = KEYS[sub(ARGV[i], 1, 1) + 0], sub(ARGV[i], 2)
  local day = call('HMGET', state, 'd|' .. field, 'u|' .. field)
  local stored, used = number_at(day[1], 0), 0
  if stored == today then
    used = number_at(day[2], 0)
  end
  if giving_back and stored ~= today then
    used = nil  -- reset since (or never charged here): nothing of it to give back
  end
  if stored and used then
    call('HSET', state, 'd|' .. field, format('%d', today), 'u|' .. field,
      format('%d', max(used + tokens, 0)))
    if call('PTTL', state) == -1 then  -- made here: it must expire like every state hash
      call('PEXPIRE', state, STATE_TTL_MS)
    end
    charged = charged + 1
  end
end
call('SET', KEYS[7], format('%d', charged), 'PX', ARGV[8])
return charged
