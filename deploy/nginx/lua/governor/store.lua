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

-- { host, port } or { socket } from GOVERNOR_REDIS__URL's forms (redis://[user:pass@]host:
-- port/db, unix:///path?db=N). TLS (rediss://) is refused: this client speaks plain TCP.
function _M.parse_url(url)
  if type(url) ~= 'string' or url == '' then
    return nil, 'GOVERNOR_REDIS__URL is not set: give redis://host:port/db'
  end
  local socket = url:match('^unix://(/[^?]+)')
  if socket then
    return {socket = socket, database = tonumber(url:match('[?&]db=(%d+)') or '0')}
  end
  local scheme, rest = url:match('^(%w+)://(.*)$')
  if scheme ~= 'redis' then
    return nil, 'GOVERNOR_REDIS__URL ' .. (scheme or '?') .. ':// is not supported here: '
      .. 'use redis://host:port/db or unix:///path (terminate TLS in a local proxy)'
  end
  local auth, hostpart = rest:match('^(.*)@([^@]*)$')
  hostpart = hostpart or rest
  local host, port, database = hostpart:match('^%[?([^%]/]-)%]?:?(%d*)/?(%d*)$')
  if not host or host == '' then
    return nil, 'GOVERNOR_REDIS__URL names no host: give redis://host:port/db'
  end
  local options = {host = host, port = tonumber(port) or 6379, database = tonumber(database) or 0}
  if auth then
    local user, password = auth:match('^([^:]*):(.*)$')
    options.username = (user ~= '' and user) or nil
    options.password = ngx.unescape_uri(password or auth)
  end
  return options
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
    if options.password then
      if options.username then
        ok, err = client:auth(options.username, options.password)
      else
        ok, err = client:auth(options.password)
      end
      if not ok then
        client:close()
        return nil, 'auth: ' .. tostring(err)
      end
    end
    if (options.database or 0) ~= 0 then
      ok, err = client:select(options.database)
      if not ok then
        client:close()
        return nil, 'select: ' .. tostring(err)
      end
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
