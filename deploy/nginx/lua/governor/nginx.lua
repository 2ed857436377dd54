-- Governor's admission for plain nginx / OpenResty (deploy/nginx/nginx.conf shows the wiring):
--   init_by_lua          init{export_dir = …}: scripts and governor.json, checked by SHA1
--   access_by_lua        access(): auth, models, admit; a non-streamed call is fetched whole
--                        through an internal location, settled, then answered (settled before
--                        the first byte, as the Python gateway settles before the last)
--   header/body filter   a streamed call: headers added, the SSE usage event metered
--   log_by_lua           log(): a streamed call is settled from a timer (cosockets are not
--                        allowed in filters or the log phase), just after its last byte

local answers = require 'governor.answers'
local config = require 'governor.config'
local gateway = require 'governor.gateway'
local metrics = require 'governor.metrics'
local store = require 'governor.store'

local _M = {}

local gw  -- built in the master by init(), inherited by every worker

-- Response headers of the upstream that are the hop's own business.
local HOP_BY_HOP = {connection = true, ['keep-alive'] = true, ['proxy-authenticate'] = true,
  ['proxy-authorization'] = true, te = true, trailer = true, ['transfer-encoding'] = true,
  upgrade = true, ['content-length'] = true}

-- nginx's own 502/504 (the model server never answered) as the Python gateway's problem.
local function upstream_answer(status)
  local detail = status == 504 and 'the model server timed out'
    or 'the model server could not be reached'
  return answers.rendered(gw.answers:upstream_failed(detail, status), ngx.var.http_accept)
end

local function unanswered(status, header_time)
  return (status == 502 or status == 504) and (header_time == nil or header_time == '-')
end

-- header_filter_by_lua of the internal location (a subrequest sharing the caller's ngx.ctx):
-- whether the model server answered at all.
function _M.upstream_header()
  ngx.ctx.governor_header_time = ngx.var.upstream_header_time
end

-- options: export_dir (what `governor gateway export-lua DIR` wrote), upstream_location
-- (the internal location that proxies to the model server; default /_governor/upstream),
-- listen and upstream (optional, for the start line only: Lua cannot see nginx's listen and
-- upstream directives), and optional overrides of governor.json's settings.
function _M.init(options)
  local settings = config.load(options)
  settings.upstream_location = options.upstream_location or '/_governor/upstream'
  gw = gateway.new(settings)
end

local function retry_held(premature)
  if not premature then
    gw:retry_held()
  end
end

-- The start line, from the first worker (cosockets need a timer here).
local function announce(premature)
  if premature then
    return
  end
  local client, err = store.connect(gw.settings.redis)
  if client == nil then
    ngx.log(ngx.ERR, 'governor: cannot reach Redis at start: ', err)
  end
  local settings = gw.settings
  local read = gw:announce(client, 'nginx module ready (' .. ngx.worker.count()
    .. ' workers): listening on ' .. (settings.listen or "nginx.conf's listen directives")
    .. ', upstream ' .. (settings.upstream or 'via ' .. settings.upstream_location))
  if read then
    store.release(client)
  elseif client ~= nil then
    client:close()  -- a failed exchange leaves the connection in an unknown state
  end
end

function _M.init_worker()
  if ngx.worker.id() == 0 and not gw.metrics:enabled() then
    ngx.log(ngx.WARN, 'governor: no lua_shared_dict ', gw.settings.metrics_dict or
      'governor_metrics', ' in nginx.conf: /metrics is off, and the policies that read ',
      'gateway_requests_total or gateway_cost_usd_total see no series from this gateway')
  end
  if ngx.worker.id() == 0 then
    local ok, err = ngx.timer.at(0, announce)
    if not ok then
      ngx.log(ngx.ERR, 'governor: cannot start the start-line timer: ', err)
    end
  end
  -- Retry-After jitter must differ between workers.
  math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  -- Settles that met a Redis outage are repeated when it answers again.
  local ok, err = ngx.timer.every(gw.settings.held_retry_seconds or 5, retry_held)
  if not ok then
    ngx.log(ngx.ERR, 'governor: cannot start the held-settle timer: ', err)
  end
end

local function respond(status, headers, body)
  ngx.status = status
  for name, value in pairs(headers) do
    ngx.header[name] = value
  end
  ngx.header['Content-Length'] = #body
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)
end

local function read_body()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if data == nil then
    local path = ngx.req.get_body_file()  -- larger than client_body_buffer_size
    if path ~= nil then
      local file = io.open(path, 'rb')
      if file ~= nil then
        data = file:read('*a')
        file:close()
      end
    end
  end
  return data or ''
end

local METHODS = {GET = ngx.HTTP_GET, HEAD = ngx.HTTP_HEAD, POST = ngx.HTTP_POST,
  DELETE = ngx.HTTP_DELETE}

-- The model server's whole answer to the request, sent with `body`, through the internal
-- location (nginx's own 502/504 as the Python gateway's problem document).
local function fetch(body)
  local ctx = ngx.ctx
  local response = ngx.location.capture(gw.settings.upstream_location .. ngx.var.uri,
    {method = METHODS[ngx.req.get_method()], body = body, args = ngx.var.args, ctx = ctx})
  local status = response.status
  if unanswered(status, ctx.governor_header_time) then
    local answer = upstream_answer(status)
    response = {status = status, header = answer.headers, body = answer.body}
  end
  return response
end

-- Send a fetched answer with the upstream's end-to-end headers and `extra`.
local function relay(response, extra)
  local headers = {}
  for name, value in pairs(response.header) do
    if not HOP_BY_HOP[name:lower()] then
      headers[name] = value
    end
  end
  for name, value in pairs(extra) do
    headers[name] = value
  end
  return respond(response.status, headers, response.body or '')
end

-- The whole answer of a non-streamed call: settle first, then send it with our headers.
local function fetch_and_settle(call)
  local response = fetch(call.body)
  local status = response.status
  call.status = status
  gw:feed(call, response.body)  -- a truncated answer is settled from what came
  gw:finish(call, status)
  return relay(response, call.headers)
end

-- A Conversations API create, add or delete, a stored response's delete or cancel, or a read
-- of a background response still charged its reservation (settled at its usage): fetched whole,
-- the tenant's record changed as the answer says, then answered (asgi: before its last byte).
local function fetch_and_record(call)
  local response = fetch(call.body)
  gw:conversation_answered(call, response.status, response.body)
  return relay(response, {})
end

function _M.access()
  local outcome = gw:decide({
    method = ngx.req.get_method(),
    path = ngx.var.uri,
    raw_path = ngx.var.request_uri:match('^[^?]*'),  -- as the client wrote it
    query = ngx.var.args,
    -- Every line (0: no limit; nginx's header buffers bound them): with the default 100, a
    -- second credential after 100 other lines went unseen and the first one was served.
    headers = ngx.req.get_headers(0),
    content_length = tonumber(ngx.var.http_content_length),
    read_body = read_body,
    client_ip = ngx.var.remote_addr,
    request_id = ngx.var.request_id,
  })
  if outcome.answer ~= nil then
    local answer = outcome.answer
    return respond(answer.status, answer.headers, answer.body)
  end
  if outcome.conversation ~= nil then
    return fetch_and_record(outcome.conversation)
  end
  local call = outcome.call
  if call == nil then
    return  -- an authenticated request that is not a model call: proxied as it is
  end
  if not call.streaming then
    return fetch_and_settle(call)
  end
  if call.changed then
    ngx.req.set_body_data(call.body)
  end
  ngx.ctx.governor = call
end

-- A streamed call's headers: ours added; an upstream that never answered (nginx's own
-- 502/504) becomes the Python gateway's problem document.
function _M.header_filter()
  local call = ngx.ctx.governor
  if call == nil then
    return
  end
  local status = ngx.status
  call.status = status
  if unanswered(status, ngx.var.upstream_header_time) then
    local answer = upstream_answer(status)
    call.replacement = answer.body
    for name, value in pairs(answer.headers) do
      ngx.header[name] = value
    end
    ngx.header['Content-Length'] = #answer.body
  end
  for name, value in pairs(call.headers) do
    ngx.header[name] = value
  end
  if call.strip ~= nil and call.replacement == nil then
    ngx.header['Content-Length'] = nil  -- the body will be shorter than the upstream said
  end
end

function _M.body_filter()
  local call = ngx.ctx.governor
  if call == nil then
    return
  end
  if call.replacement ~= nil then
    ngx.arg[1], call.replacement = call.replacement, ''
    ngx.arg[2] = true
    return
  end
  gw:feed(call, ngx.arg[1])
  if call.strip ~= nil then  -- metered above from the bytes as they came
    ngx.arg[1] = call.strip:feed(ngx.arg[1], ngx.arg[2])
  end
end

function _M.log()
  local call = ngx.ctx.governor
  if call ~= nil then
    gw:finish_later(call, call.status)
  end
end

-- content_by_lua of `location = /metrics`: the series of every worker, in Prometheus' text
-- format; with GOVERNOR_GATEWAY__METRICS_TOKEN set, only for a scrape bearing it (they name
-- every tenant and its spend), as `governor gateway` answers.
function _M.metrics()
  local settings = gw.settings
  if not metrics.scrape_allowed(settings.metrics_token, ngx.var.http_authorization) then
    ngx.header['WWW-Authenticate'] = 'Bearer realm="metrics"'
    return respond(401, {['Content-Type'] = 'text/plain'},
      '401: /metrics needs Authorization: Bearer <GOVERNOR_GATEWAY__METRICS_TOKEN>\n')
  end
  if not gw.metrics:enabled() then
    return respond(503, {['Content-Type'] = 'text/plain'}, '503: no metrics: nginx.conf has '
      .. 'no `lua_shared_dict ' .. (settings.metrics_dict or 'governor_metrics') .. ' 10m;`\n')
  end
  return respond(200, {['Content-Type'] = 'text/plain; version=0.0.4; charset=utf-8'},
    gw.metrics:render())
end

return _M
