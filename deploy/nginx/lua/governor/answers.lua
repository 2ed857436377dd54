-- What a Lua gateway answers, as controller/gateway/responses.py does: RFC 9457 problem
-- documents (401, 400, 402, 403 model-not-allowed / unknown-plan, 413, 429, 502/504, 503
-- shed / enforcement-unavailable / not-configured), sent as OpenAI's error envelope unless
-- the client's Accept names application/problem+json (`rendered`), and the IETF RateLimit /
-- RateLimit-Policy and OpenAI x-ratelimit-* headers. An answer is {status, headers, body}.

local cjson = require 'cjson.safe'
local keys = require 'governor.keys'
local numbers = require 'governor.numbers'

local _M = {}

local PROBLEM_JSON = 'application/problem+json'
local QUOTA_EXCEEDED = 'https://iana.org/assignments/http-problem-types#quota-exceeded'
local REDUCED_CAPACITY =
  'https://iana.org/assignments/http-problem-types#temporary-reduced-capacity'
local SHED_RETRY_SECONDS = 5.0  -- the controller re-decides every few seconds

local ceil, floor, max = math.ceil, math.floor, math.max
local format = string.format

local function count(value)
  if value ~= value or value == math.huge or value == -math.huge then
    return 0
  end
  return max(0, floor(value))
end

-- OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s.
function _M.openai_duration(seconds)
  if seconds < 1 then
    return format('%dms', max(0, ceil(seconds * 1000)))
  end
  local total = ceil(seconds)
  local hours, rest = floor(total / 3600), total % 3600
  local minutes, secs = floor(rest / 60), rest % 60
  if hours > 0 then
    return format('%dh%dm%ds', hours, minutes, secs)
  end
  if minutes > 0 then
    return format('%dm%ds', minutes, secs)
  end
  return format('%ds', secs)
end

-- datetime.isoformat(timespec="seconds") of a UTC unix time.
local function iso(timestamp)
  return os.date('!%Y-%m-%dT%H:%M:%S', floor(timestamp)) .. '+00:00'
end

-- Python's repr() of a str, for the details that quote what a client sent.
local function repr(text)
  local quote = "'"
  if text:find("'", 1, true) and not text:find('"', 1, true) then
    quote = '"'
  end
  local escaped = text:gsub('[%c\\' .. quote .. ']', function(c)
    local named = {['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}
    if named[c] then
      return named[c]
    end
    if c == quote then
      return '\\' .. c
    end
    return format('\\x%02x', c:byte())
  end)
  return quote .. escaped .. quote
end

-- A rate quota's limit per minute, as OpenAI's x-ratelimit-limit-* mean it (a concurrency
-- limit has no window: as is).
local function per_minute(quota)
  if quota.window_seconds <= 0 then
    return quota.limit
  end
  return quota.limit * 60.0 / quota.window_seconds
end

local function policy(address, limit, window, unit)
  -- "requests" is the draft's default unit; a token quota says so, or it reads as requests.
  local unit_parameter = unit == 'requests' and '' or ';qu="' .. unit .. '"'
  return format('"%s";q=%d%s;w=%d', address, count(limit), unit_parameter,
    max(1, floor(window + 0.5)))
end

local function state(address, remaining, reset)
  local text = format('"%s";r=%d', address, count(remaining))
  if reset == nil then
    return text
  end
  return text .. format(';t=%d', max(0, ceil(reset)))
end

-- draft-ietf-httpapi-ratelimit-headers-10 and OpenAI's headers for the tightest quotas.
-- `now`: this host's unix time (the budget's reset is a hint; budgets run on Redis time).
function _M.rate_limit_headers(result, now)
  local policies, states, headers = {}, {}, {}
  for _, item in ipairs({{result.requests, 'requests'}, {result.tokens, 'tokens'}}) do
    local quota, unit = item[1], item[2]
    if quota ~= nil then
      policies[#policies + 1] = policy(quota.address, quota.limit, quota.window_seconds, unit)
      states[#states + 1] = state(quota.address, quota.remaining, quota.reset_seconds)
      headers['x-ratelimit-limit-' .. unit] = tostring(count(per_minute(quota)))
      headers['x-ratelimit-remaining-' .. unit] = tostring(count(quota.remaining))
      headers['x-ratelimit-reset-' .. unit] = _M.openai_duration(quota.reset_seconds)
    end
  end
  local budget = result.budget
  if budget ~= nil and budget.kind == 'tokens' and budget.limit ~= nil then
    policies[#policies + 1] = policy(budget.address, budget.limit, 86400.0, 'tokens')
    local reset = budget.resets_at and max(0.0, budget.resets_at - now) or nil
    states[#states + 1] = state(budget.address, budget.remaining, reset)
  end
  if #policies > 0 then
    headers['RateLimit-Policy'] = table.concat(policies, ', ')
    headers['RateLimit'] = table.concat(states, ', ')
  end
  return headers
end

-- Say what degradation changed in the request, and why.
function _M.degrade_headers(degrade, headers)
  local changes = {}
  if degrade.model ~= nil then
    changes[#changes + 1] = 'model=' .. degrade.model
  end
  if degrade.max_tokens ~= nil then
    changes[#changes + 1] = 'max_tokens=' .. format('%d', degrade.max_tokens)
  end
  headers['x-governor-degraded'] = table.concat(changes, ';')
  headers['x-governor-degraded-reason'] = degrade.reason
end

local Answers = {}
Answers.__index = Answers

-- base_url: problem type URIs are base_url#anchor; jitter: Retry-After grows by a random
-- share up to this; now: a clock (ngx.now).
function _M.new(base_url, jitter, now)
  return setmetatable({base_url = base_url, jitter = jitter, now = now}, Answers)
end

-- err: what the problem is in OpenAI's terms, {type, code, param}.
function _M.problem(status, type_uri, title, detail, headers, extensions, err)
  local body = {type = type_uri, title = title, status = status, detail = detail}
  for name, value in pairs(extensions or {}) do
    body[name] = value
  end
  headers = headers or {}
  headers['Content-Type'] = PROBLEM_JSON
  return {status = status, headers = headers, body = cjson.encode(body), document = body,
    error = err}
end
local problem = _M.problem

local function invalid(code, param)
  return {type = 'invalid_request_error', code = code, param = param}
end

local function server(code)
  return {type = 'server_error', code = code}
end

-- OpenAI's rate-limit errors say which quota ran out in `type`: requests or tokens.
local function rate_limited(address)
  return {type = address:find('tokens', 1, true) and 'tokens' or 'requests',
    code = 'rate_limit_exceeded'}
end

-- The answer as the client asked for it: problem+json when its Accept names it, else
-- OpenAI's envelope {"error": {message, type, code, param, ...the problem's other fields}}.
function _M.rendered(answer, accept)
  if type(accept) == 'table' then
    accept = table.concat(accept, ',')
  end
  local document = answer.document
  if document == nil or (type(accept) == 'string'
      and accept:lower():find(PROBLEM_JSON, 1, true)) then
    return answer
  end
  local err = answer.error
  local fields = {}
  for name, value in pairs(document) do
    if name ~= 'detail' and name ~= 'type' then
      fields[name] = value
    end
  end
  fields.message, fields.type, fields.code = document.detail, err.type, err.code
  fields.param = err.param == nil and cjson.null or err.param
  fields.problem_type = document.type
  local headers = {}
  for name, value in pairs(answer.headers) do
    headers[name] = value
  end
  headers['Content-Type'] = 'application/json'
  return {status = answer.status, headers = headers, body = cjson.encode({error = fields})}
end

function Answers:type_uri(anchor)
  return self.base_url .. '#' .. anchor
end

-- Retry-After (delay-seconds, never 0) and retry-after-ms (which the OpenAI SDKs read
-- first), grown by a random share (<= jitter) unless `exact`; never below the true wait.
function Answers:retry_headers(seconds, exact, headers)
  local grown = exact and seconds or seconds * (1.0 + math.random() * self.jitter)
  headers = headers or {}
  headers['Retry-After'] = tostring(max(1, ceil(grown)))
  headers['retry-after-ms'] = format('%d', max(1, ceil(grown * 1000)))
  return headers
end

function Answers:unauthenticated(detail)
  -- RFC 6750: the challenge names the scheme and the error; the quote-free detail is safe.
  -- Header values must be ASCII: other characters become '?' (as asgi._ascii does).
  local description = detail:gsub('"', "'"):gsub('\\', '/'):gsub('[\192-\255][\128-\191]*', '?')
  return problem(401, self:type_uri('unauthenticated'), 'Unauthenticated', detail, {
    ['WWW-Authenticate'] = 'Bearer error="invalid_token", error_description="'
      .. description .. '"'}, nil, invalid('invalid_api_key'))
end

function Answers:model_not_allowed(plan, model, allowed)
  return problem(403, self:type_uri('model-not-allowed'), 'Model not allowed on this plan',
    format('plan %s may call %s; not %s', repr(plan), table.concat(allowed, ', '), repr(model)),
    nil, {plan = plan, model = model, allowed_models = allowed},
    invalid('model_not_allowed', 'model'))
end

-- 403: the credential names a plan the published catalog does not hold.
function Answers:unknown_plan(plan)
  return problem(403, self:type_uri('unknown-plan'), 'Unknown plan',
    format('plan %s is not in the plan catalog; the API\'s operator must move this tenant or '
      .. 'key to a known plan (governor tenants list flags them)', repr(plan)),
    nil, {plan = plan}, invalid('unknown_plan'))
end

-- 404: a route neither metered nor passed (responses.UNMETERED_ROUTE, word for word).
function Answers:unmetered_route()
  return problem(404, self:type_uri('unmetered-route'), 'Route not served',
    'this gateway serves POST /v1/chat/completions, /v1/completions, /v1/embeddings and '
      .. '/v1/responses (metered), GET /v1/models, the Conversations API (a tenant\'s own '
      .. '/v1/conversations) and a tenant\'s own stored responses (/v1/responses/{id}); any '
      .. 'other route could spend model work that no limit counts, so it is not forwarded',
    nil, nil, invalid('unknown_route'))
end

-- 404: a previous_response_id (`what` 'response') or conversation the gateway holds no record
-- of for the caller's tenant (Answers.unknown_earlier, word for word): the same words whether
-- unknown, expired or another tenant's; an id that is no safe id is not quoted back.
-- `in_path`: named by a path, not a request's field (no `param`; a response so named is no
-- previous response: response_not_found).
function Answers:unknown_earlier(what, named, in_path)
  local shown = keys.valid_id(named) and ("'" .. named .. "'") or 'with that id'
  local param, code = 'previous_response_id', 'previous_response_not_found'
  if what ~= 'response' then
    param, code = 'conversation', 'conversation_not_found'
  end
  if in_path then
    param = nil
    code = what == 'response' and 'response_not_found' or code
  end
  return problem(404, self:type_uri('unknown-' .. what), 'Unknown ' .. what,
    format('no %s %s for this API key', what, shown), nil, nil, invalid(code, param))
end

-- 503: no plan catalog or no limits in the store yet.
function Answers:not_configured()
  return problem(503, self:type_uri('not-configured'), 'Limits not configured yet',
    'no plan catalog or limits are published yet (the controller has not completed its '
      .. 'first tick); retry later',
    self:retry_headers(SHED_RETRY_SECONDS), nil, server('not_configured'))
end

-- 503: a counter the request is checked against holds what no script writes.
function Answers:corrupt_state(damage)
  return problem(503, self:type_uri('corrupt-state'), 'Limit state damaged',
    'the limits cannot be checked: ' .. damage, self:retry_headers(SHED_RETRY_SECONDS), nil,
    server('corrupt_state'))
end

function Answers:bad_request(detail, status, param)
  return problem(status or 400, self:type_uri('bad-request'), 'Bad request', detail, nil, nil,
    invalid('bad_request', param))
end

local function budget_detail(address, budget)
  if budget == nil then
    return address .. ' is spent'
  end
  if budget.kind == 'credits' then
    return 'the credit ledger ' .. budget.address .. ' holds '
      .. numbers.format('%.4f', budget.remaining)
      .. ' USD, below what this plan requires; top it up (governor credits top-up)'
  end
  local when = budget.resets_at and ('; it resets at ' .. iso(budget.resets_at)) or ''
  return format('%s has %d tokens left%s', address, max(0, floor(budget.remaining)), when)
end

-- 402, or OpenAI's own answer to a spent quota (429 insufficient_quota) when the plan chose it.
function Answers:budget_exhausted(result, headers, insufficient_quota)
  local budget = result.budget
  local address = result.denied_by or (budget and budget.address) or 'unknown'
  local extensions = {budget = address}
  if budget ~= nil then
    extensions.kind, extensions.remaining = budget.kind, budget.remaining
    extensions.limit = budget.limit == nil and cjson.null or budget.limit
    if budget.resets_at ~= nil then
      extensions.resets_at = iso(budget.resets_at)
    end
    if budget.kind == 'credits' then
      extensions.ledger = budget.address
    end
  end
  if result.retry_after ~= nil then
    self:retry_headers(result.retry_after, true, headers)
  end
  -- A spent budget is not for an automatic retry: Retry-After says when a daily budget
  -- resets (credits never refill by themselves), and the OpenAI Node SDK would sleep until
  -- then on a 429 insufficient_quota. The OpenAI SDKs obey this header.
  headers['x-should-retry'] = 'false'
  local status = insufficient_quota and 429 or 402
  local code = insufficient_quota and 'insufficient_quota' or 'budget_exhausted'
  return problem(status, self:type_uri('budget-exhausted'), 'Budget exhausted',
    budget_detail(address, budget), headers, extensions,
    {type = 'insufficient_quota', code = code})
end

-- The answer to an admission that said no: 429, 402 (or 429 insufficient_quota when the
-- plan says so), 503 or 400 (too large).
function Answers:refused(result, insufficient_quota)
  if result.outcome == 'not_configured' then
    return self:not_configured()
  end
  if result.outcome == 'corrupt_state' then
    return self:corrupt_state(result.damage)
  end
  local headers = _M.rate_limit_headers(result, self.now())
  if result.outcome == 'budget_exhausted' then
    return self:budget_exhausted(result, headers, insufficient_quota)
  end
  local address = result.denied_by or 'unknown'
  local violated = {['violated-policies'] = {address}}
  if result.outcome == 'too_large' then
    return problem(400, self:type_uri('request-too-large'), 'Request can never fit',
      'its worst case (prompt estimate + max_tokens) is above ' .. address
        .. '; lower max_tokens or the prompt', headers, violated,
      invalid('request_too_large', 'max_tokens'))
  end
  if result.outcome == 'shed' then
    self:retry_headers(result.retry_after or SHED_RETRY_SECONDS, false, headers)
    return problem(503, REDUCED_CAPACITY, 'Temporarily shed',
      'the controller has shed this traffic (' .. address .. ' is 0); retry later', headers,
      violated, server('temporarily_shed'))
  end
  local wait = result.retry_after or 1.0
  self:retry_headers(wait, false, headers)
  return problem(429, QUOTA_EXCEEDED, 'Rate limit exceeded',
    format('%s is used up; retry in %d s', address, ceil(wait)), headers, violated,
    rate_limited(address))
end

-- 503 while Redis is away: the plan fails closed, or (no plan) the key could not be checked.
function Answers:enforcement_unavailable(plan)
  local detail = plan and format('the limit store is unreachable and plan %s fails closed; '
    .. 'retry later', repr(plan))
    or 'the limit store is unreachable and this API key was not seen before; retry'
  return problem(503, self:type_uri('enforcement-unavailable'), 'Limits cannot be checked',
    detail, self:retry_headers(SHED_RETRY_SECONDS), nil, server('enforcement_unavailable'))
end

function Answers:upstream_failed(detail, status)
  local title = status == 504 and 'Upstream timed out' or 'Upstream unavailable'
  return problem(status or 502, self:type_uri('upstream-failed'), title, detail, nil, nil,
    server('upstream_failed'))
end

return _M
