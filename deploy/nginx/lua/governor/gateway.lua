-- The enforcement flow of controller/gateway/asgi.py, for any nginx-based gateway: authenticate
-- → the plan in the catalog (403 unknown-plan, 503 not-configured) → parse → plan's models
-- (403) → admit (429/402/503/400) → the call to forward → settle.
-- The adapters (governor.nginx, Kong's governor-admission plugin) do the I/O of their phase.

local admission = require 'governor.admission'
local answers = require 'governor.answers'
local auth = require 'governor.auth'
local catalog = require 'governor.catalog'
local conversations = require 'governor.conversations'
local keys = require 'governor.keys'
local metrics = require 'governor.metrics'
local openai = require 'governor.openai'
local prices = require 'governor.prices'
local store = require 'governor.store'

local _M = {}

local Gateway = {}
Gateway.__index = Gateway

-- settings: governor.config.load's answer.
function _M.new(settings)
  local now = ngx.now
  local names = keys.new(settings.key_prefix)
  local plans = catalog.new(names:plans(), settings.plan_refresh_seconds, now)
  return setmetatable({
    settings = settings,
    answers = answers.new(settings.problem_base_url, settings.retry_after_jitter, now),
    verifier = auth.new(names:api_keys(), settings.api_key_secret, settings.key_cache_seconds,
      now),
    catalog = plans,
    -- Counted into one lua_shared_dict for all workers (nil without one: metrics off).
    metrics = metrics.new(ngx.shared[settings.metrics_dict or 'governor_metrics'], settings,
      plans),
    admission = admission.new(settings, names),
    held = {},  -- settles and releases that met a Redis outage (per worker), oldest first
    -- Lookups waiting for a record (await_record), in this worker: in all and by tenant.
    waits = {total = 0, by_tenant = {}},
    pauses = _M.pauses(settings.previous_response_wait_seconds),
  }, Gateway)
end

local HELD_MAX = 10000

local function warn(...)
  ngx.log(ngx.WARN, 'governor: ', ...)
end

-- asgi._degrade: apply the plan's degradation to the request; false when nothing changed.
local function apply_degrade(request, degrade)
  local changed = false
  if degrade.max_tokens ~= nil and (request:max_tokens() or 0) > degrade.max_tokens then
    request:set_max_tokens(degrade.max_tokens)
    changed = true
  end
  if degrade.model ~= nil and request:model() ~= degrade.model then
    request:set_model(degrade.model)
    changed = true
  end
  return changed
end

-- The message of enforcement.FORWARDED_FOR_REFUSAL (Python's), word for word.
local FORWARDED_FOR_REFUSAL = "X-Forwarded-For must end in the client's IPv4 or IPv6 address, "
  .. 'as the proxy in front of the gateway appends it; its last entry is not one'

-- enforcement.forwarded_client: the last X-Forwarded-For entry (the address the trusted proxy
-- saw and appended; the entries before it are the client's own words) as keys.ip_id gives
-- it; nil when there is none; false and the refusal when the last entry is no address.
function _M.forwarded_client(forwarded)
  if type(forwarded) == 'table' then
    forwarded = table.concat(forwarded, ',')  -- repeated lines are one list
  end
  if type(forwarded) ~= 'string' or not forwarded:find('%S') then
    return nil
  end
  local last = forwarded:match('([^,]*)$'):match('^%s*(.-)%s*$')
  -- `a.b.c.d:port`, `[v6]` or `[v6]:port` (some proxies append the client's port too).
  local v6, v6_port = last:match('^%[([^%]]+)%](.*)$')
  if v6 and (v6_port == '' or v6_port:match('^:%d%d?%d?%d?%d?$')) then
    last = v6
  else
    last = last:match('^([%d.]+):%d%d?%d?%d?%d?$') or last
  end
  local ip = keys.ip_id(last)
  if ip == nil then
    return false, FORWARDED_FOR_REFUSAL
  end
  return ip
end

-- The client address the ip level counts, or false and the refusal (asgi._client_ip).
function Gateway:client_ip(req)
  if self.settings.trust_forwarded_for then
    local ip, refusal = _M.forwarded_client(req.headers['x-forwarded-for'])
    if ip ~= nil then
      return ip, refusal
    end
  end
  return keys.ip_id(req.client_ip)
end

-- One line saying the module is ready and what it enforces from: `where` (listen address,
-- upstream) and the plan catalog, read now. At warn, the example's error_log level, so it
-- shows wherever errors do. Returns whether the catalog could be read.
function Gateway:announce(client, where)
  local read = false
  if client ~= nil then
    self.catalog.loaded_at = self.catalog.now()
    read = self.catalog:refresh(client)
  end
  ngx.log(ngx.WARN, 'governor: ', where, ', plan catalog ', self.catalog:describe())
  return read
end

-- The caller's plan from the catalog, or the refusal: a plan the catalog does not hold is
-- never served (it would have no models list, no rate, no budget).
function Gateway:plan_of(client, principal)
  local plan = self.catalog:current(client, principal.plan)
  if plan ~= nil then
    return plan
  end
  local why = self.catalog:missing()
  if why == 'unreachable' then  -- never read: no plan can be known
    return nil, {answer = self.answers:enforcement_unavailable(principal.plan), broken = true}
  end
  if why == 'empty' then
    return nil, {answer = self.answers:not_configured()}
  end
  return nil, {answer = self.answers:unknown_plan(principal.plan)}
end

-- The model call after authentication and the plan: parse, check the models, admit.
-- The request's body, or the 413 when it is larger than max_body_bytes (the length it
-- declares first, then what was read).
local function read_body(self, req)
  local limit = self.settings.max_body_bytes
  if (req.content_length or 0) > limit then
    return nil, {answer = self.answers:bad_request('request body too large', 413)}
  end
  local raw = req.read_body()
  if #raw > limit then
    return nil, {answer = self.answers:bad_request('request body too large', 413)}
  end
  return raw
end

function Gateway:model_call(client, req, principal, kind, plan)
  local say = self.answers
  local raw, refused = read_body(self, req)
  if raw == nil then
    return refused
  end
  local request, problem = openai.parse(kind, raw, self.settings.default_max_tokens)
  if not request then
    return {answer = say:bad_request(problem)}
  end
  req.model = request:model()
  if not catalog.allows(plan, request:model()) then
    return {answer = say:model_not_allowed(principal.plan, request:model(), plan.models)}
  end
  local ip, refusal = self:client_ip(req)
  if ip == false then
    return {answer = say:bad_request(refusal)}
  end
  if client ~= nil then
    local unknown = self:add_earlier(client, principal, request)
    if unknown ~= nil then
      return unknown
    end
  end
  local result, err = nil, 'no connection'
  if client ~= nil then
    result, err = self.admission:admit(client, {tenant = principal.tenant,
      plan = principal.plan, user = principal.user, ip = ip,
      model = request:model(), tokens = request:worst_case_tokens(),
      request_id = req.request_id, least_tokens = request:least_tokens()}, plan)
  end
  if result == nil then
    -- No local limiter here: every plan fails closed (never "unlimited").
    warn('limit store unreachable, plan ', principal.plan, ' fails closed: ', err)
    if _M.unanswered(err) then
      self:release_unanswered({id = req.request_id, user = principal.user or '', ip = ip or ''},
        principal.tenant)
    end
    return {answer = say:enforcement_unavailable(principal.plan), broken = true}
  end
  if result.outcome == 'corrupt_state' then  -- the operator must repair it: said loudly
    ngx.log(ngx.ERR, 'governor: limit state damaged: ', result.damage)
  end
  if result.outcome ~= 'allow' then
    return {answer = say:refused(result, plan.insufficient_quota)}
  end
  local headers = answers.rate_limit_headers(result, ngx.now())
  if result.reserved ~= nil and request:fit(result.reserved) then
    -- No max_tokens from the client: the default is lowered to what is left, and said.
    headers['x-governor-max-tokens'] = string.format('%d', request:max_tokens())
  end
  local outcome = 'allow'  -- the metric's outcome label, counted when the call settles
  if result.degrade ~= nil and apply_degrade(request, result.degrade) then
    answers.degrade_headers(result.degrade, headers)
    outcome = 'degraded'
  end
  local streaming = request:streaming()
  local strip = nil
  if streaming and request:ask_for_stream_usage() then
    strip = openai.usage_filter()  -- the usage event the client did not ask for
  end
  headers['x-governor-request-id'] = req.request_id
  -- In flight from here until `finish` gives its slots back (or hands a background
  -- response's to the held part: `leaves`); its lease began about now.
  return {call = {principal = principal, request = request, streaming = streaming,
    outcome = outcome, counted = self.metrics:started(principal, request:model()),
    admitted = ngx.now(),
    reservation = result.reservation, headers = headers, body = request.raw,
    paid = plan.credits ~= nil,
    changed = request.changed, meter = openai.meter(streaming, request.prompt_tokens,
      request:worst_case_tokens(), request:background()),
    strip = strip}}
end

-- asgi.unknown_earlier_tokens: what a previous_response_id without a record reserves: the
-- model's context window when the settings name it (lower-cased by the export), else the
-- configured default.
local function unknown_earlier(settings, model)
  return settings.context_windows[string.lower(model)]
    or settings.unknown_previous_response_tokens
end

-- The tokens recorded for the tenant's response or conversation when it settled (the
-- conversation the model server reads back and bills as input); false without a record of
-- this tenant's (expired, made elsewhere, another tenant's id, an id that is no safe id);
-- nil and why when Redis fails.
function Gateway:earlier_tokens(client, tenant, what, named)
  local keys = self.admission.keys
  local key = (what == 'conversation' and keys.conversation or keys.response)(keys, tenant, named)
  if key == nil then
    return false
  end
  local text, err = client:get(key)
  if text == nil then
    return nil, 'GET ' .. key .. ': ' .. tostring(err)
  end
  if type(text) == 'string' and text:match('^%d+$') then
    return tonumber(text)
  end
  return false
end

-- waits.FIRST_PAUSE_SECONDS: the first pause between two lookups of a record.
local FIRST_PAUSE_SECONDS = 0.01

-- waits.pauses: the pauses before each further lookup of a record: 10 ms, doubling, cut so
-- they add up to `seconds` (0.5 s: 10, 20, 40, 80, 160, 190 ms; 6 lookups). None for 0.
function _M.pauses(seconds)
  local found, waited, step = {}, 0, FIRST_PAUSE_SECONDS
  while seconds - waited > 1e-9 do
    local pause = math.min(step, seconds - waited)
    found[#found + 1] = pause
    waited = waited + pause
    step = step * 2
  end
  return found
end

-- waits.tenant_share: how many of `waiters` one tenant may hold: a quarter, at least one.
function _M.tenant_share(waiters)
  if waiters <= 0 then
    return 0
  end
  return math.max(1, math.floor(waiters / 4))
end

-- asgi._await_record (controller/gateway/waits.py): the record of the tenant's response or
-- conversation `id`, asked again after each of `self.pauses` (previous_response_wait_seconds
-- in all): a client may name an answer the instant its last event reached it, while its
-- settle is still writing the record (a stream's from finish_later's timer, just after the
-- last byte; a record write waiting out a Redis blip; another replica). ngx.sleep yields:
-- the worker serves others meanwhile. false when it never came, or at once when this worker
-- already holds previous_response_waiters waits (or the tenant its share of them); nil and
-- why when Redis fails.
function Gateway:await_record(client, tenant, what, id)
  local waits, most = self.waits, self.settings.previous_response_waiters
  local keys, mine = self.admission.keys, self.waits.by_tenant[tenant] or 0
  local key = (what == 'conversation' and keys.conversation or keys.response)(keys, tenant, id)
  if #self.pauses == 0 or key == nil  -- no wait set; no safe id: no record can ever come
      or waits.total >= most or mine >= _M.tenant_share(most) then
    return false
  end
  waits.total, waits.by_tenant[tenant] = waits.total + 1, mine + 1
  local tokens, failed = false, nil
  for _, pause in ipairs(self.pauses) do
    ngx.sleep(pause)
    tokens, failed = self:earlier_tokens(client, tenant, what, id)
    if tokens ~= false then
      break
    end
  end
  waits.total = waits.total - 1
  local left = waits.by_tenant[tenant] - 1
  waits.by_tenant[tenant] = left > 0 and left or nil
  return tokens, failed
end

-- asgi._add_earlier: each earlier response or conversation named is reserved as recorded.
-- Every tenant reaches the model server with the one upstream key, so one without a record
-- of this tenant's would let it read another tenant's conversation: refused 404 (scope
-- 'tenant') before anything is forwarded, after a brief wait for the record (await_record:
-- the answer it names may still be settling); 'shared' reserves the model's context window
-- or the configured default instead, never nothing. Redis failing: every plan fails closed.
-- The refusal ({answer = ...}), or nil when the request goes on to admission.
function Gateway:add_earlier(client, principal, request)
  local strict = self.settings.previous_response_scope == 'tenant'
  for _, named in ipairs(request:earlier()) do
    local what, id = named[1], named[2]
    local tokens, failed = self:earlier_tokens(client, principal.tenant, what, id)
    if tokens == false and strict then
      tokens, failed = self:await_record(client, principal.tenant, what, id)
    end
    if tokens == nil then
      warn('limit store unreachable, plan ', principal.plan, ' fails closed: ', failed)
      return {answer = self.answers:enforcement_unavailable(principal.plan), broken = true}
    end
    if tokens == false and strict then
      return {answer = self.answers:unknown_earlier(what, id)}
    end
    request:add_earlier(tokens or unknown_earlier(self.settings, request:model()))
  end
  return nil
end

-- The record TTL in ms (asgi: settings.previous_response_ttl_seconds).
local function record_ttl_ms(settings)
  return string.format('%d',
    math.max(1, math.floor(settings.previous_response_ttl_seconds * 1000 + 0.5)))
end

-- The longest wait between two tries of a record (controller/clients/redis.py's cap).
local BACKOFF_CAP_SECONDS = 2

-- One record written, tried as `governor gateway` tries it (asgi.Enforcement.record_retry):
-- `redis.retries` more tries after the first, waiting retry_backoff_seconds × 2^(failures so
-- far), at most 2 s, before each. A failed try closes its connection (a timed-out SET must
-- not run later on it) and the next one opens another. `client`, `err`: the first try's
-- connection, or why there is none. Returns the client (nil when the last try failed) and
-- the last error.
local function record(redis, client, err, key, tokens, ttl_ms)
  for failures = 0, redis.retries do
    if failures > 0 then
      ngx.sleep(math.min(BACKOFF_CAP_SECONDS, redis.retry_backoff_seconds * 2 ^ failures))
      client, err = store.connect(redis)
    end
    if client ~= nil then
      local ok
      ok, err = client:set(key, tokens, 'PX', ttl_ms)
      if ok then
        return client
      end
      client:close()
      client = nil
    end
  end
  return nil, err
end

-- asgi._remember: a Responses answer the model server keeps: record what a later request
-- naming it will read back (its input, which holds its own earlier turns, and its output).
-- Recorded so that this tenant (only) may name it, and its conversation (asgi._kept: the
-- response's id when the model server keeps it, the conversation whatever `store` says).
-- A write that fails is tried again (`record`); given up, it is logged once with the tenant
-- and the ids, and a request continuing it gets what an id without a record gets (404 in
-- scope 'tenant', the default in 'shared'), and counted in gateway_response_records_lost_total,
-- as in `governor gateway`. Returns a connected client for the settle, or nil
-- and why not (Redis failing: the settle is held).
function Gateway:remember(call, usage)
  local keys, tenant, redis = self.admission.keys, call.principal.tenant, self.settings.redis
  local kept = {}
  local function keep(what, id)
    local key = (what == 'conversation' and keys.conversation or keys.response)(keys, tenant, id)
    -- (An id that is no safe id makes no key and is skipped: a request naming it is refused,
    -- or reserves the default.)
    if key ~= nil then
      kept[#kept + 1] = {what = what, id = id, key = key}
    end
  end
  if call.meter.response_id ~= nil and call.request:stored() then
    keep('response', call.meter.response_id)
  end
  if call.meter.conversation_id ~= nil then
    keep('conversation', call.meter.conversation_id)
  end
  local ttl_ms = record_ttl_ms(self.settings)
  local tokens = string.format('%d', math.max(0, usage.prompt + usage.completion))
  local client, err = store.connect(redis)
  for i, each in ipairs(kept) do
    client, err = record(redis, client, err, each.key, tokens, ttl_ms)
    if client == nil then
      local lost = {}
      for j = i, #kept do  -- the ones after it are not tried: Redis is away
        lost[#lost + 1] = kept[j].what .. ' ' .. kept[j].id
        self.metrics:record_lost(kept[j].what)
      end
      warn('cannot record a response\'s tokens: Redis failed all ', redis.retries + 1,
        ' tries; a request continuing it is refused 404 (or, shared, reserves the default); ',
        'tenant ', tenant, ', ', table.concat(lost, ', '), ': ', err)
      return nil, err
    end
  end
  return client, err
end

-- The Conversations API call a request is (conversations.route), or 'unserved' when the path
-- the client wrote is not the one nginx resolved (percent-escapes aside: a dot segment, a
-- doubled slash): the raw path goes upstream as it came, so what was checked must be it.
local function conversation_of(req)
  local found = conversations.route(req.method, req.path)
  local raw = req.raw_path
  if raw == nil then
    return found
  end
  -- %XX decoded as nginx decodes $uri ('+' is no space in a path: ngx.unescape_uri's is).
  raw = raw:gsub('%%(%x%x)', function(hex)
    return string.char(tonumber(hex, 16))
  end)
  if raw ~= req.path and (found ~= nil or conversations.route(req.method, raw) ~= nil) then
    return 'unserved'
  end
  return found
end

-- asgi._conversation_refusal: no call of the APIs (404 unmetered-route), a conversation or
-- response not recorded for the tenant (404 in scope 'tenant', after the wait a missing
-- record gets: await_record; an id that is no safe id in any), Redis failing (503); nil: it
-- goes on.
function Gateway:conversation_refusal(client, principal, call)
  if call == 'unserved' then
    return {answer = self.answers:unmetered_route()}
  end
  if call.action == 'create' then
    return nil
  end
  if call.id == nil then
    return {answer = self.answers:unknown_earlier(call.what, call.named, true)}
  end
  local strict = self.settings.previous_response_scope == 'tenant'
  local tokens, failed = false, nil
  if client == nil then
    tokens, failed = nil, 'no connection'
  else
    tokens, failed = self:earlier_tokens(client, principal.tenant, call.what, call.id)
    if tokens == false and strict then
      tokens, failed = self:await_record(client, principal.tenant, call.what, call.id)
    end
  end
  if tokens == nil then
    warn('limit store unreachable reading whose ', call.what, ' it is; refused: ', failed)
    return {answer = self.answers:enforcement_unavailable(principal.plan), broken = true}
  end
  if tokens == false and strict then
    return {answer = self.answers:unknown_earlier(call.what, call.id, true)}
  end
  return nil
end

-- asgi._conversation: a call of the Conversations API or on a stored response is no model
-- work, so admitted against no rate or budget (as /v1/models); only the tenant's own
-- conversation or response (scope 'tenant'). A read, a list, a cancel or new metadata passes
-- as it is; a create, an add or a delete goes as {conversation = …}: the adapter fetches it
-- whole and hands the answer to `conversation_answered`.
function Gateway:conversation_call(client, req, principal, call)
  local refusal = self:conversation_refusal(client, principal, call)
  if refusal ~= nil then
    return refusal
  end
  local charged = nil
  if not conversations.RECORDS[call.action] then
    local broken
    charged, broken = self:background_charge(client, req, principal, call)
    -- A cancel finding no charge is fetched whole too: ended, it marks the response so
    -- (settle_ended) for a streamed create settling after it.
    if charged == nil and (call.action ~= 'cancel' or broken or call.id == nil) then
      return {pass = true, principal = principal, broken = broken}
    end
  end
  local say = self.answers
  local raw, refused = read_body(self, req)
  if raw == nil then
    return refused
  end
  local added = 0
  if conversations.ADDS_ITEMS[call.action] then
    local problem
    added, problem = conversations.added_tokens(raw)
    if added == nil then
      return {answer = say:bad_request(problem)}
    end
  end
  return {conversation = {principal = principal, action = call.action, what = call.what,
    id = call.id, added = added, body = raw, charged = charged}}
end

-- asgi._background_charge: what the background response a read (GET) or a cancel names was
-- charged, while it is not settled at its usage; nil for any other call, and with Redis away
-- (the charge stands; a later read settles it; true beside it: the connection failed). Such a
-- call is then fetched whole (as a create is) and its answer handed to `conversation_answered`.
function Gateway:background_charge(client, req, principal, call)
  -- A read that streams the response's events (`?stream=true`) passes as it is: fetched whole
  -- it would reach the client only once the response is done.
  local streams = ngx.decode_args(req.query or '').stream ~= nil
  local settles = (call.action == 'read' and req.method == 'GET' and not streams)
    or call.action == 'cancel'
  if client == nil or call.what ~= 'response' or call.id == nil or not settles then
    return nil
  end
  local key = self.admission.keys:background(principal.tenant, call.id)
  if key == nil then
    return nil
  end
  local text, err = client:get(key)
  if text == nil then
    warn('limit store unreachable reading what a background response was charged; a later '
      .. 'read settles it: ', err)
    return nil, true  -- the connection is closed, not pooled
  end
  if text == ngx.null then
    return nil
  end
  return conversations.background_charge(text)
end

-- asgi._settle_background: settle a background response its answer says is finished: its
-- slots given back, and charged at the usage it finished with (one cancelled without usage:
-- at what its output holds); an answer that says no usage leaves it charged its reservation,
-- and one still running changes nothing. Held when Redis fails (a repeat changes nothing:
-- the settle record goes with the slots, charge.lua's charge record stays).
function Gateway:settle_background(call, answer)
  local done, used = conversations.finished(answer, call.id, call.charged)
  if not done then
    if conversations.running(answer, call.id) then
      self:renew_background(call)
    end
    return
  end
  -- Its slots: given back now, or held until Redis answers.
  self.metrics:given_back(call.principal.tenant, call.id)
  local tenant, charged, ttl = call.principal.tenant, call.charged, record_ttl_ms(self.settings)
  local op = function(client)
    return self.admission:settle_background(client, tenant, call.id, charged, used, ttl)
  end
  local client, err = store.connect(self.settings.redis)
  local ok = nil
  if client ~= nil then
    ok, err = op(client)
  end
  store.done(client, ok == nil)
  if ok == nil then
    warn('background settle failed (held, repeated when Redis answers): ', err)
    self:hold('charge', op)
  end
end

-- asgi._renew_background: a read found the background response still running: its kept
-- slots' lease starts again (a polled job holds them while it runs). Redis away: said, not
-- held nor repeated (the lease ends as before; the answer goes on unchanged, delayed at most
-- the store's timeout).
function Gateway:renew_background(call)
  local tenant, charged = call.principal.tenant, call.charged
  local reservation = {id = charged.request_id, user = charged.user or '', ip = charged.ip or ''}
  local client, err = store.connect(self.settings.redis)
  local renewed = nil
  if client ~= nil then
    renewed, err = self.admission:renew(client, reservation, tenant)
  end
  store.done(client, renewed == nil)
  if renewed == nil then
    warn('cannot renew the lease of a running background response\'s slots; they are freed '
      .. 'when it ends: ', err)
  elseif renewed then
    self.metrics:renewed(tenant, call.id, self.settings.lease_seconds)
  end
end

-- asgi._settle_ended: settle a read's or cancel's answer at the charge found before it was
-- forwarded, or, a cancel that found none and ended the response, at the charge a streamed
-- create settling meanwhile kept; else ENDED is left (a lease long) for that create to find
-- as it keeps its charge (keep_background gives its slots back then).
function Gateway:settle_ended(call, answer)
  if call.charged ~= nil then
    return self:settle_background(call, answer)
  end
  local key = self.admission.keys:background(call.principal.tenant, call.id)
  if key == nil or not conversations.ended(answer, call.id) then
    return
  end
  local client, err = store.connect(self.settings.redis)
  local set, text = nil, nil
  if client ~= nil then
    local lease_ms = math.ceil(self.settings.lease_seconds * 1000)
    set, err = client:set(key, conversations.ENDED, 'PX', lease_ms, 'NX')
    if set == ngx.null then  -- not set: the record is there by now
      text, err = client:get(key)
    end
  end
  local failed = set == nil or (set == ngx.null and text == nil)
  store.done(client, failed)
  if failed then
    warn('cannot mark a cancelled response ended; a create still settling keeps its slots '
      .. 'until their lease ends: ', err)
    return
  end
  call.charged = text ~= nil and text ~= ngx.null and conversations.background_charge(text)
    or nil
  if call.charged ~= nil then
    return self:settle_background(call, answer)
  end
end

-- admission.GROW_RECORD, word for word: a conversation's record grows by ARGV[1] tokens and
-- lives ARGV[2] ms more, if it is there.
local GROW_RECORD = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
  .. "redis.call('INCRBY', KEYS[1], ARGV[1]) "
  .. "redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
  .. 'return 1'

-- asgi._record_conversation: once the model server accepted (2xx) a create, record the
-- conversation for the tenant (its items' estimate, for the TTL of a response's record); an
-- add grows the record by its items' estimate; a delete forgets the conversation's or the
-- response's. A record that cannot be written is said: that conversation is then refused 404
-- (shared: the default).
-- asgi._WholeAnswer.read: an answer read for what it records (a settling read's usage, a
-- created conversation's id) up to conversations.MAX_READ_ANSWER. Past that it is passed on
-- as it is and nothing is recorded (a background response stays charged, its slots held until
-- a later read or their lease), said in a log line: decoding it would hold a worker's memory
-- and time for as large an answer as the model server cares to send.
local function readable(call, answer)
  local size = #(answer or '')
  if size <= conversations.MAX_READ_ANSWER then
    return true
  end
  warn('answer past the read cap passed on whole; nothing recorded: tenant ',
    call.principal.tenant, ', what ', call.what, ', action ', call.action, ', size ', size,
    ', cap ', conversations.MAX_READ_ANSWER)
  return false
end

function Gateway:conversation_answered(call, status, answer)
  if status == nil or status < 200 or status >= 300 then
    return
  end
  -- Only these answers are decoded (an add or a delete records what its request said).
  local settles = call.charged ~= nil or call.action == 'cancel'
  if (settles or call.action == 'create') and not readable(call, answer) then
    return
  end
  if settles then  -- a read or cancel of a background response: no record to change
    return self:settle_ended(call, answer)
  end
  local names, tenant = self.admission.keys, call.principal.tenant
  local key, made = nil, nil
  if call.action == 'create' then
    made = conversations.created_id(answer)
    key = made and names:conversation(tenant, made)
  elseif call.what == 'response' then
    key = names:response(tenant, call.id)
  else
    key = names:conversation(tenant, call.id)
  end
  if key == nil then
    return  -- no conversation in the answer, or an id that is no safe id: nothing to record
  end
  local client, err = store.connect(self.settings.redis)
  local ok = nil
  if client ~= nil then
    local ttl = record_ttl_ms(self.settings)
    local added = string.format('%d', math.max(0, call.added))
    if call.action == 'create' then
      ok, err = client:set(key, added, 'PX', ttl)
    elseif call.action == 'add_items' then
      ok, err = client:eval(GROW_RECORD, 1, key, added, ttl)
    else
      ok, err = client:del(key)
    end
  end
  store.done(client, ok == nil)
  if ok == nil then
    warn('cannot record a ', call.what, ' call (', call.action, '); a turn in it is refused '
      .. '(or, shared, reserves the default): ', err)
  end
end

-- asgi.Enforcement.pass_paths: authenticated, forwarded as they are and counted nowhere.
local PASS_PATHS = {'/v1/models'}

-- asgi.passes: only a read (GET, HEAD) of a pass path or below it, with no '..' segment, goes
-- upstream uncounted; any other route that is no model call could spend model work that no
-- limit counts.
function _M.passes(method, path, pass_paths)
  if (method ~= 'GET' and method ~= 'HEAD') or ('/' .. path .. '/'):find('/../', 1, true) then
    return false
  end
  for _, root in ipairs(pass_paths) do
    if path == root or path:sub(1, #root + 1) == root .. '/' then
      return true
    end
  end
  return false
end

function Gateway:decide_with(client, req)
  local token, detail = auth.credential(req.headers)
  if token == nil then
    return {answer = self.answers:unauthenticated(detail)}
  end
  if token:sub(1, 4) ~= 'gov_' then
    return {answer = self.answers:unauthenticated(
      'not a Governor API key (gov_…); JWT auth is not configured')}
  end
  local record, err = self.verifier:verify(client, token)
  if record == nil then
    warn('cannot check an API key: ', err)
    return {answer = self.answers:enforcement_unavailable(nil), broken = true}
  end
  if record == false then
    return {answer = self.answers:unauthenticated('unknown or revoked API key')}
  end
  local principal = {tenant = record.tenant, plan = record.plan, user = record.user,
    credential = record.key_id}
  req.principal = principal  -- for the metrics of a refusal (decide)
  local plan, refusal = self:plan_of(client, principal)
  if plan == nil then
    return refusal
  end
  local conversation = conversation_of(req)
  if conversation ~= nil then
    return self:conversation_call(client, req, principal, conversation)
  end
  local kind = req.method == 'POST' and openai.ROUTES[req.path]
  if not kind then
    if _M.passes(req.method, req.path, self.settings.pass_paths or PASS_PATHS) then
      return {pass = true, principal = principal}  -- nothing to count: forwarded as is
    end
    return {answer = self.answers:unmetered_route()}
  end
  return self:model_call(client, req, principal, kind, plan)
end

-- One request's decision. req: method, path, headers (lower-case names), content_length,
-- read_body() → the body, client_ip, request_id. Returns {answer = {status, headers, body}},
-- {pass = true, principal} or {call = …} (forward call.body; then `finish` the call).
function Gateway:decide(req)
  local client, err = store.connect(self.settings.redis)
  if client == nil then
    warn('cannot reach Redis: ', err)
  end
  if self.announce_as ~= nil then  -- a gateway made at its first request (Kong): say so once
    self:announce(client, self.announce_as)
    self.announce_as = nil
  end
  local outcome = self:decide_with(client, req)
  if outcome.answer ~= nil then
    self.metrics:request(req.principal, req.model, metrics.outcome_of(outcome.answer))
    outcome.answer = answers.rendered(outcome.answer, req.headers.accept)
  end
  store.done(client, outcome.broken)
  return outcome
end

-- A piece of the answer as it passes (call.status set first): metered unless the upstream
-- failed (a failure releases the whole hold, whatever its body says).
function Gateway:feed(call, chunk)
  if call.status ~= nil and call.status < 400 then
    call.meter:feed(chunk)
  end
end

-- Whether admit.lua went out and no answer came back (a timeout, a cut connection): Redis may
-- have run it all the same (a stalled server runs what it had read once it wakes).
function _M.unanswered(err)
  local said = tostring(err)
  return said:find('^admit: ') ~= nil and (said:find('timeout', 1, true) ~= nil
    or said:find('closed', 1, true) ~= nil or said:find('reset', 1, true) ~= nil)
end

-- asgi._release_unanswered: an admission that went out unanswered may have reserved all the
-- same; its release is held, so its slot, tokens and credits come back once Redis answers,
-- not at the end of its lease. A release of a reservation never made changes nothing.
function Gateway:release_unanswered(reservation, tenant)
  self:hold('release', function(client)
    return self.admission:release(client, reservation, tenant)
  end, true)
  warn('admission unanswered; its release is held until Redis answers (', reservation.id, ')')
end

-- Keep a store call (settle or release) that met a Redis outage, to repeat when it answers:
-- the reservation's settle record outlives its lease by the record grace, so a late settle
-- still charges what was used (as controller/gateway/pending.py does for Python). A `spare`
-- call charges nothing (a lease undoes it later): a full queue gives it up first.
function Gateway:hold(what, op, spare)
  local held = self.held
  if #held >= HELD_MAX then
    local first = 1
    for i, call in ipairs(held) do
      if call.spare then
        first = i
        break
      end
    end
    local gone = table.remove(held, first)
    self.metrics:lost(gone.what)
    if gone.spare then
      warn('a held release of an unanswered admission was given up (the queue is full): ',
        'its holds end with their lease')
    else
      warn('a held store call was given up (the queue is full): its usage is not charged')
    end
  end
  held[#held + 1] = {at = ngx.now(), what = what, op = op, spare = spare}
end

-- Error replies that say the server (or the cluster) cannot serve anyone right now, not that
-- it refused this one call (clients/redis.py `_WHOLE_SERVER_REPLIES`): an outage in all but
-- name. Inside a script an ACL refusal is `ERR The user executing the script can't run…`.
local WHOLE_SERVER = {OOM = true, MASTERDOWN = true, NOREPLICAS = true, BUSY = true,
  LOADING = true, TRYAGAIN = true, CLUSTERDOWN = true, READONLY = true, NOAUTH = true,
  NOPERM = true}
local SCRIPT_NOPERM = "The user executing the script can't run"
-- This many refusals in a row and Redis is taken to refuse every call (pending.py).
local MAX_REFUSALS_IN_A_ROW = 8

-- Whether a failed store call met a Redis that answered and refused this call alone (a key
-- of the wrong type on one tenant): `<script>: <CODE> message`. A cut connection or a
-- timeout ('closed', 'timeout') carries no code: an outage.
function _M.refused_alone(err)
  local said = tostring(err)
  local reply = said:match('^[%w_]+: (.*)$') or said
  local code = reply:match('^(%u+) ')
  return code ~= nil and not WHOLE_SERVER[code] and not reply:find(SCRIPT_NOPERM, 1, true)
end

-- Repeat the held calls oldest first; calls older than the record grace are given up. A call
-- Redis refuses by itself goes to the back and the pass goes on (one broken record must not
-- hold every other tenant's settle until it expires, as pending.py has it); the first that
-- meets an outage (Redis still away) ends the pass. From a timer. Returns how many went.
function Gateway:retry_held()
  local held = self.held
  if #held == 0 then
    return 0
  end
  local client = store.connect(self.settings.redis)
  if client == nil then
    return 0
  end
  local grace, now, i, done = self.settings.record_grace_seconds or 3600, ngx.now(), 1, 0
  local refused, in_a_row, outage = {}, 0, false
  while i <= #held and in_a_row < MAX_REFUSALS_IN_A_ROW do
    local first = held[i]
    if now - first.at > grace then
      self.metrics:lost(first.what)
      warn('a held ', first.what, ' was given up (its settle record has expired): its ',
        'usage is not charged')
    else
      local ok, err = first.op(client)
      if ok ~= nil then
        done, in_a_row = done + 1, 0
      elseif _M.refused_alone(err) then
        warn('a held store call was refused; the ones behind it go on (', first.what, '): ', err)
        refused[#refused + 1] = first
        in_a_row = in_a_row + 1
      else
        outage = true
        break
      end
    end
    i = i + 1
  end
  local rest = {}
  for j = i, #held do
    rest[#rest + 1] = held[j]
  end
  for _, call in ipairs(refused) do
    rest[#rest + 1] = call  -- to the back: the others were tried first next time too
  end
  self.held = rest
  store.done(client, outage)
  if done > 0 then
    ngx.log(ngx.NOTICE, 'governor: ', done, ' held store calls went through; ', #rest,
      ' still held')
  end
  return done
end

-- asgi._runs_on: whether the model server goes on generating after this answer: a
-- background response answered unfinished (no usage yet, a `status` not final) that a later
-- read can settle. One answered already ended without usage gives its slots back now.
local function runs_on(call, usage)
  local request = call.request
  return request:background() and request:stored() and usage.estimated
    and not call.meter:ended() and call.meter.response_id ~= nil
end

-- asgi._keep_background: a background answer settled at its whole reservation (its usage
-- comes later), its slots kept: keep what it was charged, so a read or cancel that sees it
-- finished gives the slots back and settles the difference. Not kept (a Redis failure,
-- logged): it stays charged its reservation, its slots held until their lease ends.
function Gateway:keep_background(client, call, usage, model)
  local named, tenant = call.meter.response_id, call.principal.tenant
  local key = self.admission.keys:background(tenant, named)
  if key == nil then
    return
  end
  local total, money = usage.prompt + usage.completion, nil
  if call.paid then  -- the credits settle.lua took: only a plan that held them at admission
    money = total > 0 and prices.to_micro(self.admission.prices:cost(model, usage.prompt,
      usage.completion)) or 0
  end
  local now, err = client:time()
  local before = nil  -- what the record held: ENDED when a cancel came first
  local reservation = call.reservation
  if now then
    before, err = client:set(key, conversations.background_record({
      request_id = reservation.id, plan = call.principal.plan, user = call.principal.user,
      ip = reservation.ip ~= '' and reservation.ip or nil, model = model,
      prompt = usage.prompt, completion = usage.completion, cost_micro = money,
      day = math.floor(tonumber(now[1]) / 86400)}), 'PX', record_ttl_ms(self.settings), 'GET')
  end
  if before == conversations.ENDED then
    -- A cancel ended it before this settle (a streamed create's client has the id from its
    -- first event): nothing generates; the charge is kept for a read with usage.
    self.metrics:given_back(tenant, named)
    before, err = self.admission:release(client, reservation, tenant)
  end
  if before == nil then
    warn('cannot keep what a background response is charged (or give back the slots of one '
      .. 'cancelled); it stays charged its reservation: tenant ', tenant, ', response ', named,
      ': ', err)
    client:close()  -- a failed exchange leaves the connection in an unknown state
  end
end

-- asgi._leaves: the call leaves the in-flight gauge as its slots are given back: at once, or,
-- a background answer whose generation goes on (`running`: its slots kept by the settle),
-- when a read gives them back or what is left of its admission's lease has passed. Once.
function Gateway:leaves(call, running)
  if not call.counted then
    return
  end
  call.counted = false
  local named, left = nil, 0
  if running then
    named = call.meter.response_id
    left = self.settings.lease_seconds - (ngx.now() - call.admitted)
  end
  self.metrics:finished(call.principal, call.request:model(), named, left)
end

-- Settle an answered call (status: the upstream's; nil when it never answered): charge what
-- the answer says it used, or release the whole hold when it failed. Runs once per call.
function Gateway:finish(call, status)
  if call.settled then
    return
  end
  call.settled = true
  local reservation, tenant, what, op = call.reservation, call.principal.tenant, nil, nil
  local usage = nil  -- a settle's: recorded for a later request continuing this response
  local failed = status == nil or status >= 400
  self.metrics:request(call.principal, call.request:model(),
    failed and 'upstream_error' or call.outcome)
  if failed then
    self:leaves(call, false)
    what = 'release'
    op = function(client)
      return self.admission:release(client, reservation, tenant)
    end
  else
    local model
    usage, model = call.meter:finish(), call.request:model()
    if usage.estimated then
      ngx.log(ngx.INFO, 'governor: upstream sent no usage; settled from an estimate')
    end
    self.metrics:usage(call.principal, model, usage.prompt, usage.completion,
      self.admission.prices:cost(model, usage.prompt, usage.completion))
    what = 'settle'
    -- A background answer's generation goes on after it: its slots stay held.
    local running = runs_on(call, usage)
    self:leaves(call, running)
    op = function(client)
      local known, failure = self.admission:settle(client, reservation, tenant, usage, model,
        running)
      -- Kept only once its charge is on the books (a held settle keeps it when it lands): a
      -- settle that never landed must refund nothing.
      if known and running then
        self:keep_background(client, call, usage, model)
      end
      return known, failure
    end
  end
  local client, err
  if usage ~= nil then
    -- Recorded before the settle, so a settle seen (the stream's, from this timer) means the
    -- record is in place for the next turn; a record Redis failed every try of leaves no
    -- connection, and the settle is held.
    client, err = self:remember(call, usage)
  else
    client, err = store.connect(self.settings.redis)
  end
  if client == nil then
    warn(what, ': cannot reach Redis (held, repeated when it answers): ', err)
    self:hold(what, op)
    return
  end
  local ok
  ok, err = op(client)
  store.done(client, ok == nil)
  if ok == nil then
    warn(what, ' failed (held, repeated when it answers): ', err)
    self:hold(what, op)
  end
end

local function finish_in_timer(premature, gw, call, status)
  if not premature then
    gw:finish(call, status)
  end
end

-- `finish` from a timer, for the phases where cosockets are not allowed (body filter, log):
-- it runs right after the last byte. A timer that cannot start leaves the hold to its lease.
function Gateway:finish_later(call, status)
  if call.settled then
    return
  end
  local ok, err = ngx.timer.at(0, finish_in_timer, self, call, status)
  if not ok then
    warn('cannot settle (the lease releases the hold later): ', err)
    self:leaves(call, false)  -- not held in the gauge for as long: nothing would lower it
  end
end

return _M
