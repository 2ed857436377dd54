-- The Lua side of admit.lua and settle.lua: the same KEYS and ARGV as
-- controller/gateway/admission.py builds, and its reading of the 19-value answer.

local numbers = require 'governor.numbers'
local prices_module = require 'governor.prices'
local store = require 'governor.store'

local _M = {}

local OUTCOMES = {allow = true, rate_limited = true, budget_exhausted = true, shed = true,
  too_large = true}
local to_micro = prices_module.to_micro

local function quota(reply, first)
  local address = reply[first]
  if address == nil or address == '' then
    return nil
  end
  return {address = address, limit = tonumber(reply[first + 1]),
    remaining = tonumber(reply[first + 2]), reset_seconds = tonumber(reply[first + 3]) / 1000,
    window_seconds = tonumber(reply[first + 4]) / 1000}
end

local function budget(reply)
  local address = reply[14]
  if address == nil or address == '' then
    return nil
  end
  if reply[15] == 'credits' then
    return {address = address, kind = 'credits', limit = nil,
      remaining = tonumber(reply[17]) / 1000000, resets_at = nil}
  end
  return {address = address, kind = 'tokens', limit = tonumber(reply[16]),
    remaining = tonumber(reply[17]), resets_at = tonumber(reply[18]) / 1000}
end

-- admission._degrade: the plan's degradation once the tightest token budget is past
-- `at_percent` spent, or nil.
local function degrade(plan, spent_budget, model)
  local spec = plan.degrade
  if spec == nil or spent_budget == nil or spent_budget.kind ~= 'tokens'
      or not spent_budget.limit or spent_budget.limit == 0 then
    return nil
  end
  local spent = 100.0 * (1.0 - spent_budget.remaining / spent_budget.limit)
  if spent < spec.at_percent then
    return nil
  end
  local target = spec.model
  if target == model then
    target = nil
  end
  if spec.max_tokens == nil and target == nil then
    return nil
  end
  return {max_tokens = spec.max_tokens, model = target,
    reason = spent_budget.address .. ' is ' .. numbers.format('%.0f', spent)
      .. '% spent (the plan degrades from ' .. numbers.format('%g', spec.at_percent) .. '%)'}
end

-- The answer as admission.AdmissionResult's fields, or nil and why it cannot be read.
local function parse(reply, plan, request, ip)
  if type(reply) ~= 'table' or #reply ~= 19 or not OUTCOMES[reply[1]] then
    return nil, 'admit.lua answered something else: the script and this module disagree'
  end
  local result = {outcome = reply[1], denied_by = reply[2] ~= '' and reply[2] or nil,
    requests = quota(reply, 4), tokens = quota(reply, 9), budget = budget(reply)}
  local spent_budget = result.budget
  if result.outcome == 'rate_limited' or (result.outcome == 'budget_exhausted'
      and spent_budget ~= nil and spent_budget.kind == 'tokens') then
    result.retry_after = tonumber(reply[3]) / 1000  -- credits do not refill by themselves
  end
  if result.outcome == 'allow' then
    result.reservation = {id = request.request_id, user = request.user or '', ip = ip}
    result.degrade = degrade(plan, spent_budget, request.model)
  end
  return result
end

local Admission = {}
Admission.__index = Admission

-- settings: the loaded configuration (config.lua); keys: governor.keys for its prefix.
function _M.new(settings, keys)
  return setmetatable({
    keys = keys,
    prices = prices_module.new(settings.prices),
    admit_script = settings.scripts.admit,
    settle_script = settings.scripts.settle,
    lease_ms = tostring(math.floor(settings.lease_seconds * 1000 + 0.5)),
    record_ms = tostring(math.floor(settings.record_grace_seconds * 1000 + 0.5)),
    history_length = tostring(settings.history_length),
  }, Admission)
end

-- Decide on one request in one round trip. request: tenant, plan, user (nil: none), ip
-- (ip_id form or nil), model, tokens, request_id; plan: the catalog's entry. Returns the
-- result, or nil and the Redis failure.
function Admission:admit(client, request, plan)
  local ip = request.ip or ''
  local credit_cost, credit_floor = '', ''
  if plan.credits ~= nil then
    credit_cost = string.format('%d', to_micro(self.prices:worst_case(request.model,
      request.tokens)))
    credit_floor = string.format('%d', to_micro(plan.credits.min_balance_usd))
  end
  local keys = self.keys:admit_keys(request.tenant, request.plan, request.user or '', ip)
  local reply, err = store.run(client, self.admit_script, keys, {
    request.request_id,
    string.format('%d', request.tokens),
    request.model or '',
    request.tenant,
    request.plan,
    request.user or '',
    ip ~= '' and '1' or '',
    self.lease_ms,
    self.record_ms,
    credit_cost,
    credit_floor,
  })
  if reply == nil then
    return nil, err
  end
  return parse(reply, plan, request, ip)
end

local function settle(self, client, reservation, tenant, tokens, cost_micro, model, prompt,
    completion)
  local keys = self.keys:settle_keys(tenant, reservation.user, reservation.ip)
  local reply, err = store.run(client, self.settle_script, keys, {
    reservation.id,
    string.format('%d', tokens),
    string.format('%d', cost_micro),
    model or '',
    self.history_length,
    prompt and string.format('%d', prompt) or '',
    completion and string.format('%d', completion) or '',
  })
  if reply == nil then
    return nil, err
  end
  return reply == 1
end

-- Charge what the request used ({prompt, completion}): refund the rest of its hold or
-- charge the excess. Returns false when the reservation was unknown, nil and why on failure.
function Admission:settle(client, reservation, tenant, usage, model)
  local total = usage.prompt + usage.completion
  local cost = self.prices:cost(model, usage.prompt, usage.completion)
  return settle(self, client, reservation, tenant, math.max(total, 0),
    total > 0 and to_micro(cost) or 0, model, usage.prompt, usage.completion)
end

-- The request failed before using anything: refund its whole hold.
function Admission:release(client, reservation, tenant)
  return settle(self, client, reservation, tenant, 0, 0, nil, nil, nil)
end

return _M
