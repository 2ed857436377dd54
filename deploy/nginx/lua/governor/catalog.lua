-- The plan catalog `<P>:plans` the controller publishes (controller/gateway/catalog.py):
-- models, fail mode, degradation and credits per plan, cached per worker and reread every
-- `plan_refresh_seconds`. A plan it does not hold allows any model and fails closed.

local cjson = require 'cjson.safe'

local _M = {}

local null = cjson.null
local DEFAULT_PLAN = {models = {}, fail_mode = 'closed'}

local function value(x)
  if x == null then
    return nil
  end
  return x
end

-- One catalog entry (PlanSpec JSON with models, fail_mode, degrade, credits), or nil.
local function plan_info(text)
  local spec = cjson.decode(text)
  if type(spec) ~= 'table' then
    return nil
  end
  local info = {models = type(spec.models) == 'table' and spec.models or {},
    fail_mode = spec.fail_mode == 'open' and 'open' or 'closed'}
  local degrade = value(spec.degrade)
  if type(degrade) == 'table' then
    info.degrade = {at_percent = tonumber(value(degrade.at_percent)) or 90.0,
      max_tokens = value(degrade.max_tokens), model = value(degrade.model)}
  end
  local credits = value(spec.credits)
  if type(credits) == 'table' then
    info.credits = {min_balance_usd = tonumber(value(credits.min_balance_usd)) or 0.0}
  end
  return info
end

local Catalog = {}
Catalog.__index = Catalog

function _M.new(key, refresh_seconds, now)
  return setmetatable({key = key, refresh_seconds = refresh_seconds, now = now, plans = {},
    loaded_at = nil}, Catalog)
end

-- The plan, rereading the whole catalog when the cache is older than refresh_seconds. A
-- failed read keeps the last good catalog (the admission that follows reports Redis's
-- failure itself) and waits a period before trying again.
function Catalog:current(client, plan)
  local now = self.now()
  local due = self.loaded_at == nil or now - self.loaded_at >= self.refresh_seconds
  if client ~= nil and due then
    self.loaded_at = now
    local entries = client:hgetall(self.key)
    if type(entries) == 'table' then
      local plans = {}
      for i = 1, #entries, 2 do
        plans[entries[i]] = plan_info(entries[i + 1])
      end
      self.plans = plans
    end
  end
  return self.plans[plan] or DEFAULT_PLAN
end

local function contains(list, item)
  for _, each in ipairs(list) do
    if each == item then
      return true
    end
  end
  return false
end

-- Whether the plan may call `model` (a request naming no model always may).
function _M.allows(info, model)
  return #info.models == 0 or model == nil or contains(info.models, model)
end

return _M
