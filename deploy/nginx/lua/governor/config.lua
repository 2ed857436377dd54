-- A Lua gateway's configuration: what `governor gateway export-lua DIR` wrote (the scripts and
-- governor.json), the secrets from the environment (as for `governor gateway`), and overrides.

local cjson = require 'cjson.safe'
local crypto = require 'governor.crypto'
local store = require 'governor.store'

local _M = {}

local function read(path)
  local file, err = io.open(path, 'rb')
  if not file then
    error('governor: cannot read ' .. path .. ' (' .. tostring(err) .. '); run '
      .. '`governor gateway export-lua DIR` and point export_dir at DIR', 0)
  end
  local data = file:read('*a')
  file:close()
  return data
end

-- The exported script `name`, checked against the SHA1 governor.json recorded: a file edited
-- by hand would be a different script from the one the Python gateways run.
local function script(directory, name, expected)
  local source = read(directory .. '/' .. name .. '.lua')
  local sha = crypto.hex(ngx.sha1_bin(source))
  if sha ~= expected then
    error('governor: ' .. directory .. '/' .. name .. '.lua has SHA1 ' .. sha .. ', not the '
      .. tostring(expected) .. ' governor.json names; export again instead of editing it', 0)
  end
  return {name = name, sha = sha, source = source}
end

local function getenv(name)
  local value = os.getenv(name)
  if value == nil or value == '' then
    return nil
  end
  return value
end

-- options: export_dir (required), redis (a table {host, port, password, database, socket}
-- or nil: GOVERNOR_REDIS__URL), api_key_secret (nil: GOVERNOR_GATEWAY__API_KEY_SECRET), and
-- any governor.json setting to override (e.g. retry_after_jitter).
function _M.load(options)
  local directory = options.export_dir
  if type(directory) ~= 'string' then
    error('governor: export_dir must name the directory `governor gateway export-lua` wrote', 0)
  end
  local settings, err = cjson.decode(read(directory .. '/governor.json'))
  if type(settings) ~= 'table' or settings.format ~= 1 then
    error('governor: ' .. directory .. '/governor.json is not an export of format 1 ('
      .. tostring(err or settings and settings.format) .. '); export again', 0)
  end
  -- An export from before these settings has none: what a request continuing an earlier
  -- Responses answer reserves must be known, never guessed here.
  if type(settings.unknown_previous_response_tokens) ~= 'number'
      or type(settings.previous_response_ttl_seconds) ~= 'number'
      or type(settings.context_windows) ~= 'table' then
    error('governor: ' .. directory .. '/governor.json has no previous_response_ttl_seconds, '
      .. 'unknown_previous_response_tokens or context_windows (an export older than this '
      .. 'module); export again', 0)
  end
  for name, value in pairs(options) do
    if name ~= 'export_dir' and name ~= 'redis' then
      settings[name] = value
    end
  end
  -- Whose earlier response or conversation a request may name: never guessed. An export
  -- from before the setting (or a value no version writes) would otherwise forward another
  -- tenant's id under the one upstream key.
  local scope = settings.previous_response_scope
  if scope ~= 'tenant' and scope ~= 'shared' then
    error('governor: ' .. directory .. '/governor.json has no previous_response_scope '
      .. '"tenant" or "shared" (' .. tostring(scope) .. '; an export older than this module?); '
      .. 'export again', 0)
  end
  -- How long, and how many at once, a lookup without a record waits for it: as exported.
  local wait, waiters = settings.previous_response_wait_seconds, settings.previous_response_waiters
  if type(wait) ~= 'number' or not (wait >= 0 and wait <= 2) or type(waiters) ~= 'number'
      or waiters ~= math.floor(waiters) or waiters < 0 then
    error('governor: ' .. directory .. '/governor.json has no previous_response_wait_seconds '
      .. '(0 to 2) or previous_response_waiters (a whole number from 0) (' .. tostring(wait)
      .. ', ' .. tostring(waiters) .. '; an export older than this module?); export again', 0)
  end
  settings.scripts = {
    admit = script(directory, 'admit', settings.scripts.admit),
    settle = script(directory, 'settle', settings.scripts.settle),
    charge = script(directory, 'charge', settings.scripts.charge),
  }
  if settings.api_key_secret == nil then
    settings.api_key_secret = getenv('GOVERNOR_GATEWAY__API_KEY_SECRET')
  end
  if settings.metrics_token == nil then
    settings.metrics_token = getenv('GOVERNOR_GATEWAY__METRICS_TOKEN')
  end
  local redis = options.redis
  if redis == nil then
    redis, err = store.parse_url(getenv('GOVERNOR_REDIS__URL'))
    if not redis then
      error('governor: ' .. err, 0)
    end
    redis.password = getenv('GOVERNOR_REDIS__PASSWORD') or redis.password
    redis.username = getenv('GOVERNOR_REDIS__USERNAME') or redis.username
    redis.ssl_verify = (getenv('GOVERNOR_REDIS__VERIFY_TLS') or 'true'):lower() ~= 'false'

  end
  local timeout = tonumber(getenv('GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS') or '2')
  redis.timeout_ms = redis.timeout_ms or math.floor(timeout * 1000)
  -- How a failed record of a Responses answer is tried again, as `governor gateway` does
  -- (RedisSettings: the same variables and defaults).
  redis.retries = redis.retries or tonumber(getenv('GOVERNOR_REDIS__RETRIES') or '3')
  redis.retry_backoff_seconds = redis.retry_backoff_seconds
    or tonumber(getenv('GOVERNOR_REDIS__RETRY_BACKOFF_SECONDS') or '0.05')
  local retries, backoff = redis.retries, redis.retry_backoff_seconds
  if type(retries) ~= 'number' or retries ~= math.floor(retries) or retries < 0
      or retries > 20 then
    error('governor: GOVERNOR_REDIS__RETRIES must be a whole number from 0 to 20, not '
      .. tostring(getenv('GOVERNOR_REDIS__RETRIES')), 0)
  end
  if type(backoff) ~= 'number' or not (backoff > 0) or backoff == math.huge then
    error('governor: GOVERNOR_REDIS__RETRY_BACKOFF_SECONDS must be a number of seconds above '
      .. '0, not ' .. tostring(getenv('GOVERNOR_REDIS__RETRY_BACKOFF_SECONDS')), 0)
  end
  settings.redis = redis
  return settings
end

return _M
