-- Add to (or, with a negative amount, correct) a tenant's credit balance and log it.
--
-- KEYS  1 tenant credits  2 tenant credit history (stream)
-- ARGV  1 amount, micro-USD  2 kind ('top-up' or 'adjustment')  3 reason  4 actor
--       5 history length kept
-- Returns the new balance in micro-USD.

local balance = call('HINCRBY', KEYS[1], 'balance', ARGV[1])
call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'kind', ARGV[2],
  'amount_micro_usd', ARGV[1], 'balance_micro_usd', balance, 'reason', ARGV[3],
  'actor', ARGV[4])
return balance
