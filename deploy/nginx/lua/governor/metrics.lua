-- The module's Prometheus counters: the series Governor's own policies and alerts read, under
-- the names and labels `governor gateway` exports (controller/gateway/metrics.py), kept in a
-- shared dict so that every worker counts into one set, and served as text at /metrics.

local crypto = require 'governor.crypto'

local _M = {}

local CAPPED, ABSENT = '_other', '_none'  -- metrics.py's CAPPED and ABSENT
local SEP = '\31'  -- between a key's parts; never in a label value (control bytes are replaced)

-- id → series family. `closed`: label sets exported at 0 from the start, so that
-- `increase()` sees their first event (as metrics.py does).
local FAMILIES = {
  requests = {name = 'gateway_requests_total', labels = {'tenant', 'plan', 'model', 'outcome'},
    help = 'Requests by tenant, plan, model and outcome'},
  tokens = {name = 'gateway_tokens_total', labels = {'tenant', 'plan', 'model', 'kind'},
    help = 'Tokens used (settled), by kind: prompt or completion'},
  cost = {name = 'gateway_cost_usd_total', labels = {'tenant', 'plan', 'model'},
    help = 'Cost of the tokens used, in USD'},
  lost = {name = 'gateway_store_calls_lost_total', labels = {'operation'},
    help = 'Held settles and releases given up (past their settle record, or the queue full)',
    closed = {{'release'}, {'settle'}, {'charge'}}},
  records = {name = 'gateway_response_records_lost_total', labels = {'kind'},
    help = 'Records of a kept Responses answer (its id, or its conversation) given up after '
      .. 'every try failed',
    closed = {{'response'}, {'conversation'}}},
  dropped = {name = 'gateway_metrics_dropped_total', labels = {},
    help = 'Counter increments lost because the lua_shared_dict of the metrics was full',
    closed = {{}}},
  -- A gauge: the calls open (`started` until `finished`) and, rendered with them, the
  -- background responses held ('held' keys, `held` until `given_back` or their lease).
  inflight = {name = 'gateway_requests_in_flight', labels = {'tenant', 'plan', 'model'},
    help = 'Requests admitted and still holding their slots (a background response: until '
      .. 'read finished or its lease ends), by tenant, plan and model', gauge = true},
}
local ORDER = {'requests', 'tokens', 'cost', 'lost', 'records', 'dropped', 'inflight'}
local HELD = 'held' .. SEP

-- The outcome label of a refusal, by its OpenAI error code (answers.lua), as metrics.py's
-- OUTCOMES name them; any other refusal of a request is a bad request.
local OUTCOME_OF_CODE = {
  invalid_api_key = 'unauthenticated',
  model_not_allowed = 'model_not_allowed',
  unknown_plan = 'unknown_plan',
  not_configured = 'not_configured',
  enforcement_unavailable = 'fail_closed',
  corrupt_state = 'corrupt_state',
  budget_exhausted = 'budget_exhausted',
  insufficient_quota = 'budget_exhausted',
  request_too_large = 'too_large',
  temporarily_shed = 'shed',
  rate_limit_exceeded = 'rate_limited',
  upstream_failed = 'upstream_error',
}

function _M.outcome_of(answer)
  local code = answer.error and answer.error.code
  return OUTCOME_OF_CODE[code] or 'bad_request'
end

local Metrics = {}
Metrics.__index = Metrics

-- dict: the lua_shared_dict (nil: metrics off; the start line says so). settings: the
-- module's (metrics_max_tenants, metrics_max_models, prices). catalog: for the models the
-- plans name, which keep their names without taking a place under the cap.
function _M.new(dict, settings, catalog)
  local self = setmetatable({dict = dict, catalog = catalog,
    max_tenants = settings.metrics_max_tenants or 1000,
    max_models = settings.metrics_max_models or 50,
    priced = (settings.prices or {}).models or {}}, Metrics)
  if dict ~= nil then
    for id, family in pairs(FAMILIES) do
      for _, values in ipairs(family.closed or {}) do
        dict:safe_add(id .. SEP .. table.concat(values, SEP), 0)
      end
    end
  end
  return self
end

function Metrics:enabled()
  return self.dict ~= nil
end

-- Add `amount` to one series; a dict with no room counts the loss instead of evicting
-- another series (an evicted counter would restart from 0 and read as a reset).
function Metrics:add(id, values, amount)
  local dict = self.dict
  if dict == nil or amount == 0 then
    return
  end
  local key = id .. SEP .. table.concat(values, SEP)
  local _, err = dict:incr(key, amount)
  if err ~= 'not found' then
    return
  end
  local ok, why = dict:safe_add(key, amount)
  if ok then
    return
  end
  if why == 'exists' then  -- another worker added it meanwhile
    dict:incr(key, amount)
    return
  end
  dict:incr('dropped' .. SEP, 1)
end

local function clean(value)
  return (tostring(value):gsub('%c', '?'))
end

function Metrics:known_model(model)
  if self.priced[model] ~= nil then
    return true
  end
  for _, plan in pairs(self.catalog.plans or {}) do
    for _, named in ipairs(plan.models) do
      if named == model then
        return true
      end
    end
  end
  return false
end

-- The label of a capped value (metrics.py's LabelCap): the first `limit` distinct values
-- keep their names, later ones are `_other`; those `known(value)` says the operator named
-- keep theirs without a place (asked only of a value not seen yet: it walks the catalog);
-- `peek`: never take a place (a model its plan refused did nothing). Workers share the
-- count, so two first sightings at the same instant may name one value past the limit.
function Metrics:capped(kind, value, limit, known, peek)
  if value == nil or value == '' then
    return ABSENT
  end
  value = clean(value)
  local dict, key = self.dict, 'seen' .. SEP .. kind .. SEP .. value
  if dict:get(key) ~= nil or (known ~= nil and known(self, value)) then
    return value
  end
  if peek or (dict:get('count' .. SEP .. kind) or 0) >= limit then
    return CAPPED
  end
  local ok, err = dict:safe_add(key, true)
  if ok then
    dict:incr('count' .. SEP .. kind, 1, 0)
    return value
  end
  return err == 'exists' and value or CAPPED
end

function Metrics:labels(principal, model, peek_model)
  principal = principal or {}
  local name = model and string.lower(model)
  return {
    self:capped('tenant', principal.tenant, self.max_tenants, nil, false),
    self:capped('plan', principal.plan, self.max_models, nil, false),
    self:capped('model', name, self.max_models, Metrics.known_model, peek_model),
  }
end

-- One request's outcome (metrics.py's GatewayMetrics.request).
function Metrics:request(principal, model, outcome)
  if self.dict == nil then
    return
  end
  local labels = self:labels(principal, model, outcome == 'model_not_allowed')
  labels[4] = outcome
  self:add('requests', labels, 1)
end

-- What a settled request used, and its cost in USD (GatewayMetrics.usage).
function Metrics:usage(principal, model, prompt, completion, cost)
  if self.dict == nil then
    return
  end
  local labels = self:labels(principal, model, false)
  self:add('tokens', {labels[1], labels[2], labels[3], 'prompt'}, prompt)
  self:add('tokens', {labels[1], labels[2], labels[3], 'completion'}, completion)
  if cost > 0 then
    self:add('cost', labels, cost)
  end
end

-- An admitted call begins (GatewayMetrics.started): true when counted, so that its end
-- (`finished`) lowers only a count it raised (a full dict drops the rise, and a lowering of
-- nothing would read as another call's end).
function Metrics:started(principal, model)
  if self.dict == nil then
    return false
  end
  local key = 'inflight' .. SEP .. table.concat(self:labels(principal, model, false), SEP)
  local _, err = self.dict:incr(key, 1, 0)
  if err ~= nil then
    self.dict:incr('dropped' .. SEP, 1)
    return false
  end
  return true
end

-- The end of a call `started` counted. `response_id` and `seconds`: a background response
-- whose slots stay held (GatewayMetrics.held): counted as held until `given_back` or
-- `seconds` (what is left of its admission's lease) have passed, the dict's own expiry.
function Metrics:finished(principal, model, response_id, seconds)
  local labels = table.concat(self:labels(principal, model, false), SEP)
  if response_id ~= nil and seconds > 0 then
    local ok = self.dict:safe_set(HELD .. principal.tenant .. SEP .. response_id, labels, seconds)
    if not ok then
      self.dict:incr('dropped' .. SEP, 1)
    end
  end
  self.dict:incr('inflight' .. SEP .. labels, -1)
end

-- A background response's slots were given back (GatewayMetrics.given_back): no longer
-- held; nothing when this nginx holds none (another gateway's, given back, or expired).
function Metrics:given_back(tenant, response_id)
  if self.dict ~= nil then
    self.dict:delete(HELD .. tenant .. SEP .. response_id)
  end
end

-- A held background response's slots' lease was renewed by a read (GatewayMetrics.renewed):
-- it stays in flight `seconds` more; nothing when this nginx holds none.
function Metrics:renewed(tenant, response_id, seconds)
  if self.dict ~= nil then
    self.dict:expire(HELD .. tenant .. SEP .. response_id, seconds)
  end
end

function Metrics:lost(operation)
  self:add('lost', {operation}, 1)
end

-- A record of a kept answer given up (`kind`: response or conversation).
function Metrics:record_lost(kind)
  self:add('records', {kind}, 1)
end

local function escaped(value)
  return (value:gsub('\\', '\\\\'):gsub('"', '\\"'):gsub('\n', '\\n'))
end

local function number(value)
  if value == math.floor(value) and math.abs(value) < 2 ^ 53 then
    return string.format('%d', value)
  end
  return string.format('%.17g', value)
end

-- The text exposition format (version 0.0.4) of every series, families in a fixed order and
-- series sorted within them.
function Metrics:render()
  local series, held = {inflight = {}}, {}
  for _, key in ipairs(self.dict:get_keys(0)) do
    local id = key:match('^([^' .. SEP .. ']*)' .. SEP)
    if FAMILIES[id] ~= nil then
      series[id] = series[id] or {}
      series[id][#series[id] + 1] = key
    elseif id == 'held' then
      local labels = self.dict:get(key)  -- nil: its lease ended since get_keys
      if labels ~= nil then
        local open = 'inflight' .. SEP .. labels
        if held[open] == nil and self.dict:get(open) == nil then
          series.inflight[#series.inflight + 1] = open  -- held, none of its kind open
        end
        held[open] = (held[open] or 0) + 1
      end
    end
  end
  local out = {}
  for _, id in ipairs(ORDER) do
    local family = FAMILIES[id]
    out[#out + 1] = '# HELP ' .. family.name .. ' ' .. family.help
    out[#out + 1] = '# TYPE ' .. family.name .. (family.gauge and ' gauge' or ' counter')
    local keys = series[id] or {}
    table.sort(keys)
    for _, key in ipairs(keys) do
      local value = self.dict:get(key)
      if held[key] ~= nil then
        value = (value or 0) + held[key]
      end
      if value ~= nil then
        local values, parts = {}, {}
        for part in (key .. SEP):gmatch('([^' .. SEP .. ']*)' .. SEP) do
          values[#values + 1] = part  -- the family's id, then its label values
        end
        for i, label in ipairs(family.labels) do
          parts[i] = label .. '="' .. escaped(values[i + 1] or '') .. '"'
        end
        local labels = #parts > 0 and ('{' .. table.concat(parts, ',') .. '}') or ''
        out[#out + 1] = family.name .. labels .. ' ' .. number(value)
      end
    end
  end
  return table.concat(out, '\n') .. '\n'
end

-- Whether a scrape may read the series (app.py's scrape_allowed): always without a token;
-- with one, only `Authorization: Bearer <token>`, compared in constant time (crypto.equal).
function _M.scrape_allowed(token, authorization)
  if token == nil then
    return true
  end
  if type(authorization) ~= 'string' then
    return false
  end
  -- Only spaces and tabs around the token (as a key's): no other byte makes it match.
  local scheme, given = authorization:match('^([^ \t]+)[ \t]+(.-)[ \t]*$')
  if scheme == nil or scheme:lower() ~= 'bearer' or given == '' then
    return false
  end
  return crypto.equal(given, token)
end

return _M
