-- Kong plugin `governor-admission`: Governor's admission (the same admit.lua and settle.lua as
-- `governor gateway`, by EVALSHA) around a Kong route. A thin wrapper of deploy/nginx/lua's
-- governor.gateway, with Kong's PDK doing the I/O of each phase:
--   access         auth, the plan's models, admit; refusals by kong.response.exit; a
--                  non-streamed call turns on buffered proxying
--   response       (buffered calls) settle from the whole answer before Kong sends it
--   header_filter  the rate-limit headers; body_filter: a stream's usage event is metered
--   log            a streamed call is settled from a timer, just after its last byte
--   init_worker    a timer repeating the settles that met a Redis outage

local config = require 'governor.config'
local gateway = require 'governor.gateway'

local GovernorAdmission = {
  -- After Kong's authentication plugins (key-auth: 1250), beside its rate-limiting (910):
  -- Governor's limits replace Kong's on a route, never add to them.
  PRIORITY = 905,
  VERSION = '0.1.0',
}

-- Kong gives an unset optional field as ngx.null.
local function present(value)
  if value == ngx.null then
    return nil
  end
  return value
end

-- One gateway per plugin configuration (Kong hands the same table to every request).
local gateways = setmetatable({}, {__mode = 'k'})

local function gateway_for(conf)
  local gw = gateways[conf]
  if gw == nil then
    local settings = config.load({
      export_dir = conf.export_dir,
      api_key_secret = present(conf.api_key_secret),
      trust_forwarded_for = false,  -- Kong's trusted_ips decide (kong.client.get_forwarded_ip)
      redis = {host = conf.redis_host, port = conf.redis_port,
        username = present(conf.redis_username), password = present(conf.redis_password),
        database = conf.redis_database,
        timeout_ms = conf.redis_timeout_ms},
    })
    gw = gateway.new(settings)
    -- The start line, at this configuration's first request in this worker (a plugin has
    -- no start of its own with its configuration in hand).
    gw.announce_as = 'Kong plugin governor-admission ready (worker ' .. ngx.worker.id()
      .. '): listening on the route, upstream the route\'s service'
    gateways[conf] = gw
  end
  return gw
end

-- Settles that met a Redis outage are held by each gateway and repeated when it answers.
local function retry_held(premature)
  if not premature then
    for _, gw in pairs(gateways) do
      gw:retry_held()
    end
  end
end

function GovernorAdmission:init_worker()
  local ok, err = ngx.timer.every(5, retry_held)
  if not ok then
    kong.log.err('governor: cannot start the held-settle timer: ', err)
  end
end

function GovernorAdmission:access(conf)
  local gw = gateway_for(conf)
  local outcome = gw:decide({
    method = kong.request.get_method(),
    path = kong.request.get_path(),
    raw_path = kong.request.get_raw_path(),  -- as the client wrote it (Kong >= 2.8)
    query = kong.request.get_raw_query(),
    -- Every line, as the nginx module reads them: kong.request.get_headers stops at 100 (at
    -- most 1000), and a second credential past that went unseen, the first one served.
    headers = ngx.req.get_headers(0),
    content_length = tonumber(kong.request.get_header('content-length')),
    read_body = function()
      return kong.request.get_raw_body() or ''
    end,
    client_ip = kong.client.get_forwarded_ip(),
    request_id = ngx.var.request_id,
  })
  if outcome.answer ~= nil then
    local answer = outcome.answer
    return kong.response.exit(answer.status, answer.body, answer.headers)
  end
  -- The client's credential is the gateway's business: it never reaches the upstream
  -- (nginx.conf's proxy_set_header, the Python gateway's dropped headers). A model server
  -- key of its own is set after this (request-transformer runs at a lower priority).
  kong.service.request.clear_header('Authorization')
  kong.service.request.clear_header('X-Api-Key')
  if outcome.conversation ~= nil then
    -- A Conversations API create, add or delete, a stored response's delete or cancel, or a
    -- read of a background response still charged its reservation: the response
    -- phase reads the whole answer and changes the tenant's record before Kong sends it.
    kong.ctx.plugin.conversation = outcome.conversation
    kong.service.request.enable_buffering()
    return
  end
  local call = outcome.call
  if call == nil then
    return  -- authenticated, not a model call: proxied as it is
  end
  kong.ctx.plugin.call = call
  if call.changed then
    kong.service.request.set_raw_body(call.body)
  end
  if not call.streaming then
    kong.service.request.enable_buffering()  -- the response phase then sees the whole answer
  end
end

-- Buffered (non-streamed) calls: settled before the first byte reaches the client, so its
-- next request finds this one's usage on the books (as with the Python gateway).
function GovernorAdmission:response(conf)
  local conversation = kong.ctx.plugin.conversation
  if conversation ~= nil then
    gateway_for(conf):conversation_answered(conversation, kong.service.response.get_status(),
      kong.service.response.get_raw_body())
    return
  end
  local call = kong.ctx.plugin.call
  if call == nil then
    return
  end
  local gw = gateway_for(conf)
  call.status = kong.service.response.get_status()
  gw:feed(call, kong.service.response.get_raw_body())
  gw:finish(call, call.status)
end

function GovernorAdmission:header_filter(conf)
  local call = kong.ctx.plugin.call
  if call == nil then
    return
  end
  call.status = call.status or kong.service.response.get_status()
  for name, value in pairs(call.headers) do
    kong.response.set_header(name, value)
  end
  if call.strip ~= nil then
    kong.response.clear_header('Content-Length')  -- the body will be shorter than upstream's
  end
end

function GovernorAdmission:body_filter(conf)
  local call = kong.ctx.plugin.call
  if call ~= nil and call.streaming then
    gateway_for(conf):feed(call, ngx.arg[1])
    if call.strip ~= nil then  -- metered above from the bytes as they came
      ngx.arg[1] = call.strip:feed(ngx.arg[1], ngx.arg[2])
    end
  end
end

-- Streamed calls: cosockets are not allowed in the filters or the log phase, so the settle
-- runs in a timer right after the last byte.
function GovernorAdmission:log(conf)
  local call = kong.ctx.plugin.call
  if call ~= nil then
    gateway_for(conf):finish_later(call, call.status)
  end
end

return GovernorAdmission
