-- The Lua side of admit.lua and settle.lua: the same KEYS and ARGV as
-- controller/gateway/admission.py builds (the limits resolved by governor.limits), and its
-- reading of the answer.

local limits_module = require 'governor.limits'
local numbers = require 'governor.numbers'
local prices_module = require 'governor.prices'
local store = require 'governor.store'

local _M = {}

local OUTCOMES = {allow = true, rate_limited = true, budget_exhausted = true, shed = true,
  too_large = true}
local to_micro = prices_module.to_micro

-- Stale answers (the limits changed since they were read) read them again; three in a row
-- is Redis misbehaving.
local ATTEMPTS = 3

local function quota(resolved, reply, first)
  local check = resolved.checks[tonumber(reply[first])]
  if check == nil then
    return nil
  end
  return {address = check.address, limit = check.value, remaining = tonumber(reply[first + 1]),
    reset_seconds = tonumber(reply[first + 2]) / 1000,
    window_seconds = (limits_module.PERIOD_MS[check.kind] or 0) / 1000}
end

local function budget(resolved, reply, tenant)
  local number = tonumber(reply[10])
  if number < 0 then
    return {address = 'credits/' .. tenant, kind = 'credits', limit = nil,
      remaining = tonumber(reply[11]) / 1000000, resets_at = nil}
  end
  local check = resolved.checks[number]
  if check == nil then
    return nil
  end
  return {address = check.address, kind = 'tokens', limit = check.value,
    remaining = tonumber(reply[11]), resets_at = tonumber(reply[12]) / 1000}
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

-- admission._corrupt: {'corrupt', key, field, what it holds, repair}, refused (fail closed);
-- the wording is clients/redis.not_governors'.
local function corrupt(reply)
  local where = reply[2] .. ' field ' .. reply[3]
  return {outcome = 'corrupt_state', denied_by = reply[2] .. ' ' .. reply[3],
    damage = where .. " holds '" .. reply[4] .. "', not a record Governor writes (refused: "
      .. 'fail closed): ' .. reply[5]}
end

-- The answer as admission.AdmissionResult's fields, or nil and why it cannot be read.
local function parse(reply, plan, request, ip, resolved)
  if type(reply) == 'table' and #reply == 5 and reply[1] == 'corrupt' then
    return corrupt(reply)
  end
  if type(reply) ~= 'table' or #reply ~= 12 or not OUTCOMES[reply[1]] then
    return nil, 'admit.lua answered something else: the script and this module disagree'
  end
  local verdict, address = limits_module.verdict(resolved, request.tokens)
  if verdict then
    return {outcome = reply[1], denied_by = address}
  end
  local result = {outcome = reply[1],
    denied_by = limits_module.address(resolved, tonumber(reply[2]), request.tenant),
    requests = quota(resolved, reply, 4), tokens = quota(resolved, reply, 7),
    budget = budget(resolved, reply, request.tenant)}
  local spent_budget = result.budget
  if result.outcome == 'rate_limited' or (result.outcome == 'budget_exhausted'
      and spent_budget ~= nil and spent_budget.kind == 'tokens') then
    result.retry_after = tonumber(reply[3]) / 1000  -- credits do not refill by themselves
  end
  if result.outcome == 'allow' then
    result.reservation = {id = request.request_id, user = request.user or '', ip = ip}
    result.degrade = degrade(plan, spent_budget, request.model)
    result.reserved = request.tokens
  end
  return result
end

-- admission._lowered: a daily budget refused a reservation sized by default: what is left
-- of it when the request still fits there, else nil (the refusal stands).
local function lowered(result, request)
  local spent, least = result.budget, request.least_tokens
  if least == nil or result.outcome ~= 'budget_exhausted' or spent == nil
      or spent.kind ~= 'tokens' then
    return nil
  end
  local room = math.floor(spent.remaining)
  if least <= room and room < request.tokens then
    return room
  end
  return nil
end

-- A copy of the request with another reservation size.
local function sized(request, tokens)
  local copy = {}
  for name, value in pairs(request) do
    copy[name] = value
  end
  copy.tokens = tokens
  return copy
end

local Admission = {}
Admission.__index = Admission

-- settings: the loaded configuration (config.lua); keys: governor.keys for its prefix.
function _M.new(settings, keys)
  return setmetatable({
    keys = keys,
    limits = limits_module.new(keys),
    prices = prices_module.new(settings.prices),
    admit_script = settings.scripts.admit,
    settle_script = settings.scripts.settle,
    charge_script = settings.scripts.charge,
    lease_ms = tostring(math.floor(settings.lease_seconds * 1000 + 0.5)),
    record_ms = tostring(math.floor(settings.record_grace_seconds * 1000 + 0.5)),
    history_length = tostring(settings.history_length),
  }, Admission)
end

-- Decide on one request in one round trip. request: tenant, plan, user (nil: none), ip
-- (ip_id form or nil), model, tokens, request_id; plan: the catalog's entry. Returns the
-- result, or nil and the Redis failure.
function Admission:credits(plan, request)
  if plan.credits == nil then
    return {}
  end
  return {string.format('%d', to_micro(self.prices:worst_case(request.model, request.tokens))),
    string.format('%d', to_micro(plan.credits.min_balance_usd))}
end

function Admission:admit(client, request, plan)
  local ip = request.ip or ''
  -- A model's limits are met without regard to case (model.py's model_key: ASCII only, as here).
  local user, model = request.user or '', string.lower(request.model or '')
  local keys = self.keys:admit_keys(request.tenant, user, ip)
  local last = nil
  for _ = 1, ATTEMPTS do
    local resolved, err = self.limits:get(client, request.tenant, request.plan, user, ip, model)
    if resolved == nil then
      return nil, err
    end
    if resolved.version == '' then  -- the controller has written nothing: no limit is known
      return {outcome = 'not_configured'}
    end
    if request.least_tokens ~= nil then
      request = sized(request, limits_module.fitted(resolved, request.tokens,
        request.least_tokens))
    end
    local credits = self:credits(plan, request)
    local args = {request.request_id, string.format('%d', request.tokens), resolved.version,
      self.lease_ms, self.record_ms, model}
    local verdict = limits_module.verdict(resolved, request.tokens)
    if verdict then
      args[7] = verdict
    else
      args[7] = resolved.letters
      for _, text in ipairs(resolved.limits) do
        args[#args + 1] = text
      end
      for _, text in ipairs(credits) do
        args[#args + 1] = text
      end
    end
    local reply
    reply, err = store.run(client, self.admit_script, keys, args)
    if reply == nil then
      return nil, err
    end
    if type(reply) == 'table' and #reply == 2 and reply[1] == 'stale' then
      self.limits:stale(reply[2])
    else
      local result, problem = parse(reply, plan, request, ip, resolved)
      if result == nil then
        return nil, problem
      end
      last = result
      local room = lowered(result, request)
      if room == nil then
        return result
      end
      request = sized(request, room)  -- a default that fits what is left
    end
  end
  if last ~= nil then
    return last
  end
  return nil, 'the limits changed ' .. ATTEMPTS .. ' times during one admission'
end

-- settle.lua; `mode` its ARGV 8: '1' keeps the slots, '2' renews kept ones, '' settles all.
local function settle(self, client, reservation, tenant, tokens, cost_micro, model, prompt,
    completion, mode)
  local keys = self.keys:settle_keys(tenant, reservation.user, reservation.ip)
  local reply, err = store.run(client, self.settle_script, keys, {
    reservation.id,
    string.format('%d', tokens),
    string.format('%d', cost_micro),
    model or '',
    self.history_length,
    prompt and string.format('%d', prompt) or '',
    completion and string.format('%d', completion) or '',
    mode or '',
    self.lease_ms,
    self.record_ms,
  })
  if reply == nil then
    return nil, err
  end
  return reply == 1
end

-- Charge what the request used ({prompt, completion}): refund the rest of its hold or
-- charge the excess. `keep_slots`: the request goes on after its answer (a background
-- response): its concurrency slots stay held until a release (or their lease ends).
-- Returns false when the reservation was unknown, nil and why on failure.
function Admission:settle(client, reservation, tenant, usage, model, keep_slots)
  local total = usage.prompt + usage.completion
  local cost = self.prices:cost(model, usage.prompt, usage.completion)
  return settle(self, client, reservation, tenant, math.max(total, 0),
    total > 0 and to_micro(cost) or 0, model, usage.prompt, usage.completion,
    keep_slots and '1' or '')
end

-- The request failed before using anything: refund its whole hold.
function Admission:release(client, reservation, tenant)
  return settle(self, client, reservation, tenant, 0, 0, nil, nil, nil)
end

-- admission.renew: a background answer a read found still running: the slots its settle
-- kept get a new lease as long as an admission's, from now, every level's in one script
-- (idempotent: never shortened). False when nothing is kept for it any more; nil and why.
function Admission:renew(client, reservation, tenant)
  return settle(self, client, reservation, tenant, 0, 0, nil, nil, nil, '2')
end

-- background.REASON: the credit history's reason for a background answer's settle.
local BACKGROUND_REASON = 'background response settled at its usage'

-- admission._charge's budgets: each daily token budget in force, as charge.lua names it
-- ('<level 1-4><field>': the level's index, the limit and its model, e.g. '3tokens_per_day').
local function budgets_of(resolved, tenant, user)
  local owners = {'global/', 'ip/', 'tenant/' .. tenant .. '/',
    'user/' .. tenant .. '/' .. user .. '/'}
  local found = {}
  for _, check in ipairs(resolved.checks) do
    if check.kind == 'tokens_per_day' then
      for level, owner in ipairs(owners) do
        if check.address:sub(1, #owner) == owner then
          found[#found + 1] = level .. check.address:sub(#owner + 1)
          break
        end
      end
    end
  end
  return found
end

-- admission.settle_background: settle the tenant's finished background answer
-- `response_id`: the concurrency slots it kept while it generated are given back (once), and
-- with the usage its response reports ({prompt, completion}; nil: none, the charge stands)
-- it is charged at that usage: the difference from what it was charged (`charged`, as
-- conversations.background_charge reads it) on the daily budgets and the credits, once
-- (charge.lua's charge record, kept `ttl_ms`); then its record holds its true total and what
-- it was charged is forgotten. Returns true, or nil and why.
function Admission:settle_background(client, tenant, response_id, charged, used, ttl_ms)
  local user, ip = charged.user or '', charged.ip or ''
  local released, err = self:release(client, {id = charged.request_id, user = user, ip = ip},
    tenant)
  if released == nil then
    return nil, err
  end
  if used == nil then
    return true
  end
  local model = string.lower(charged.model)
  local resolved
  resolved, err = self.limits:get(client, tenant, charged.plan, user, ip, model)
  if resolved == nil then
    return nil, err
  end
  local total = used.prompt + used.completion
  local cost = ''
  if charged.cost_micro ~= nil then
    local price = total > 0 and to_micro(self.prices:cost(charged.model, used.prompt,
      used.completion)) or 0
    cost = string.format('%d', price - charged.cost_micro)
  end
  local request_id = charged.request_id .. '.background'
  local args = {request_id, string.format('%d', total - (charged.prompt + charged.completion)),
    cost, model, self.history_length, string.format('%d', used.prompt),
    string.format('%d', used.completion), ttl_ms, BACKGROUND_REASON,
    string.format('%d', charged.day)}
  for _, budget in ipairs(budgets_of(resolved, tenant, user)) do
    args[#args + 1] = budget
  end
  local keys = self.keys:charge_keys(tenant, user, ip, request_id)
  local reply
  reply, err = store.run(client, self.charge_script, keys, args)
  if reply == nil then
    return nil, err
  end
  local ok
  -- Only a record still there (a deleted response is not made again).
  ok, err = client:set(self.keys:response(tenant, response_id), string.format('%d', total),
    'XX', 'KEEPTTL')
  if ok == nil then
    return nil, err
  end
  ok, err = client:del(self.keys:background(tenant, response_id))
  if ok == nil then
    return nil, err
  end
  return true
end

return _M
