-- The price table of controller/gateway/prices.py (exported in governor.json): USD per 1k
-- tokens, and the integer micro-USD amounts credits move. Same float operations, same order,
-- so every amount equals the Python gateway's to the micro-dollar.

local _M = {}

local MICRO = 1000000

-- USD → micro-USD, rounded up (a charge is never smaller than its price).
function _M.to_micro(usd)
  return math.ceil(usd * MICRO - 1e-9)
end

local Table = {}
Table.__index = Table

-- `document`: governor.json's prices ({models = {name = {prompt_per_1k, completion_per_1k}},
-- default = {...}}).
function _M.new(document)
  return setmetatable({models = document.models or {}, default = document.default}, Table)
end

-- The table's names are in lower case (prices.py keys it by model_key): a model is priced
-- without regard to case, as it is limited.
function Table:price(model)
  return (model and self.models[string.lower(model)]) or self.default
end

-- USD for one request's actual usage.
function Table:cost(model, prompt, completion)
  local price = self:price(model)
  return (prompt * price.prompt_per_1k + completion * price.completion_per_1k) / 1000.0
end

-- USD for tokens whose split between prompt and completion is not known yet.
function Table:worst_case(model, tokens)
  local price = self:price(model)
  return tokens * math.max(price.prompt_per_1k, price.completion_per_1k) / 1000.0
end

return _M
