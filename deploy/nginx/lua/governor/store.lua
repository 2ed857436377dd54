-- Redis for the Lua gateways: connections from the cosocket pool, and the enforcement scripts
-- run by EVALSHA, loaded with SCRIPT LOAD when the server answers NOSCRIPT.

-- Kong and OpenResty ship lua-resty-redis as `resty.redis`; Debian as `nginx.redis`.
local found, redis = pcall(require, 'resty.redis')
if not found then
  redis = require 'nginx.redis'
end

local _M = {}

local POOL_IDLE_MS = 60000
local POOL_SIZE = 100
-- Why a Redis Cluster is refused: this module speaks to one Redis; Debian packages no
-- maintained Lua Redis Cluster client, and a hand-made slot router is untested here.
local NO_CLUSTER = 'the nginx/Kong module does not support Redis Cluster (it speaks to one '
  .. 'Redis; no maintained Lua Cluster client is packaged): serve through `governor gateway` '
  .. '(redis+cluster://) or give the module a standalone Redis (docs/nginx-kong.md)'

-- { host, port } or { socket } from GOVERNOR_REDIS__URL's forms (redis[s]://[user:pass@]
-- host:port/db, unix:///path?db=N). rediss:// adds { ssl = true, server_name = host }: the
-- handshake verifies the server against nginx's `lua_ssl_trusted_certificate` unless
-- GOVERNOR_REDIS__VERIFY_TLS is false.
function _M.parse_url(url)
  if type(url) ~= 'string' or url == '' then
    return nil, 'GOVERNOR_REDIS__URL is not set: give redis://host:port/db'
  end
  local socket = url:match('^unix://(/[^?]+)')
  if socket then
    return {socket = socket, database = tonumber(url:match('[?&]db=(%d+)') or '0')}
  end
  local scheme, rest = url:match('^([%w+]+)://(.*)$')
  if scheme == 'redis+cluster' or scheme == 'rediss+cluster' then
    return nil, 'GOVERNOR_REDIS__URL ' .. scheme .. '://: ' .. NO_CLUSTER
  end
  if scheme ~= 'redis' and scheme ~= 'rediss' then
    return nil, 'GOVERNOR_REDIS__URL ' .. (scheme or '?') .. ':// is not supported here: '
      .. 'use redis://host:port/db, rediss://host:port/db or unix:///path'
  end
  local auth, hostpart = rest:match('^(.*)@([^@]*)$')
  hostpart = hostpart or rest
  local host, port, database = hostpart:match('^%[?([^%]/]-)%]?:?(%d*)/?(%d*)$')
  if not host or host == '' then
    return nil, 'GOVERNOR_REDIS__URL names no host: give redis://host:port/db'
  end
  local options = {host = host, port = tonumber(port) or 6379, database = tonumber(database) or 0}
  if scheme == 'rediss' then
    -- nginx checks a certificate's DNS names only: for an address, the chain alone is checked.
    local address = host:match('^[%d.]+$') or host:find(':', 1, true)
    options.ssl, options.server_name = true, (not address) and host or nil
  end
  if auth then
    local user, password = auth:match('^([^:]*):(.*)$')
    options.username = (user ~= '' and user) or nil
    options.password = ngx.unescape_uri(password or auth)
  end
  return options
end

local function tls_failure(reason)
  return 'TLS: ' .. tostring(reason) .. ' (is the Redis certificate signed by a CA in '
    .. 'lua_ssl_trusted_certificate? the error log line before this one says more)'
end

-- A connected client; AUTH and SELECT run only on a fresh connection (a pooled one has had
-- them). Returns nil and the reason when Redis cannot be reached.
function _M.connect(options)
  local client, err = redis:new()
  if not client then
    return nil, err
  end
  client:set_timeout(options.timeout_ms or 2000)
  local ok
  if options.socket then
    ok, err = client:connect('unix:' .. options.socket)
  else
    ok, err = client:connect(options.host, options.port)
  end
  if not ok then
    return nil, 'connect: ' .. tostring(err)
  end
  if client:get_reused_times() == 0 then
    if options.ssl then
      -- lua-resty-redis before 0.28 takes no TLS option: the handshake on its socket.
      ok, err = rawget(client, '_sock'):sslhandshake(false, options.server_name,
        options.ssl_verify ~= false)
      if not ok then
        client:close()
        return nil, tls_failure(err)
      end
    end
    local step
    if options.password then
      step = 'auth'
      if options.username then
        ok, err = client:auth(options.username, options.password)
      else
        ok, err = client:auth(options.password)
      end
    elseif options.ssl then
      -- Some ngx_lua builds report a certificate they refused as a handshake that worked
      -- (and log the refusal): the first command on it then finds the socket closed.
      step = 'ping'
      ok, err = client:ping()
    end
    if ok and (options.database or 0) ~= 0 then
      step = 'select'
      ok, err = client:select(options.database)
    end
    if not ok then
      client:close()
      if options.ssl and err == 'closed' then
        return nil, tls_failure('the connection closed after the handshake')
      end
      return nil, step .. ': ' .. tostring(err)
    end
    -- Once per new connection: a Cluster node behind a plain URL is refused (each request
    -- fails closed, saying why) instead of answering MOVED for most keys.
    local info = client:info('cluster')
    if type(info) == 'string' and info:find('cluster_enabled:1', 1, true) then
      client:close()
      return nil, 'Redis at ' .. (options.socket or (options.host .. ':' .. options.port))
        .. ' is a Cluster node: ' .. NO_CLUSTER
    end
  end
  return client
end

-- Back to the pool (or closed, if the pool will not take it).
function _M.release(client)
  local ok = client:set_keepalive(POOL_IDLE_MS, POOL_SIZE)
  if not ok then
    client:close()
  end
end

-- A connection done with: back to the pool, or closed when its exchange failed (its state is
-- unknown: a timed-out command may still answer on it). None (nil): nothing to do.
function _M.done(client, failed)
  if client == nil then
    return
  end
  if failed then
    client:close()
  else
    _M.release(client)
  end
end

-- EVALSHA `script` ({name, sha, source}); on NOSCRIPT (a restarted, failed-over or flushed
-- server) SCRIPT LOAD it and call once more. Never retried otherwise: a repeated admit could
-- reserve twice. Returns the reply, or nil and the reason.
function _M.run(client, script, keys, args)
  local command = {script.sha, #keys}
  for _, key in ipairs(keys) do
    command[#command + 1] = key
  end
  for _, arg in ipairs(args) do
    command[#command + 1] = arg
  end
  local reply, err = client:evalsha(unpack(command))
  if reply == false and tostring(err):find('^NOSCRIPT') then
    local loaded, load_err = client:script('load', script.source)
    if not loaded then
      return nil, 'SCRIPT LOAD ' .. script.name .. ': ' .. tostring(load_err)
    end
    reply, err = client:evalsha(unpack(command))
  end
  if not reply then
    return nil, script.name .. ': ' .. tostring(err)
  end
  return reply
end

return _M
