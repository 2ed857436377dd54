-- Add to (or, with a negative amount, correct) a tenant's credit balance and log it, once.
--
-- KEYS  1 tenant credits  2 tenant credit history (stream)  3 this booking's record
-- ARGV  1 amount, micro-USD  2 kind ('top-up' or 'adjustment')  3 reason  4 actor
--       5 history length kept  6 the record's lifetime, ms
-- Returns the new balance in micro-USD.
--
-- The record makes a repeat a no-op: a client whose first try got no answer (a Redis stalled
-- past the socket timeout runs it all the same when it wakes) sends the same booking again,
-- and each try used to add the amount once more.

if call('EXISTS', KEYS[3]) == 1 then
  return tonumber(call('HGET', KEYS[1], 'balance') or '0')
end
local balance = call('HINCRBY', KEYS[1], 'balance', ARGV[1])
call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'kind', ARGV[2],
  'amount_micro_usd', ARGV[1], 'balance_micro_usd', balance, 'reason', ARGV[3],
  'actor', ARGV[4])
call('SET', KEYS[3], ARGV[1], 'PX', ARGV[6])
return balance
