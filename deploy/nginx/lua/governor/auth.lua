-- API keys as controller/gateway/keys.py and auth.py check them: `gov_<16 hex id>_<secret>`,
-- the record looked up by id in `<P>:apikeys`, the digest (HMAC-SHA256 with the server secret,
-- else SHA-256) compared in constant time; verified records cached per worker.

local cjson = require 'cjson.safe'
local crypto = require 'governor.crypto'
local keys = require 'governor.keys'

local _M = {}

local CACHE_SIZE = 10000

-- auth.ONE_CREDENTIAL (Python's), word for word.
local ONE_CREDENTIAL = 'send one credential: %s holds several (a repeated header, or a list); '
  .. 'the gateway will not pick one of them'

-- A repeated header's lines joined by ',' in order, as Python's `_headers` joins them.
local function joined(value)
  if type(value) == 'table' then
    return table.concat(value, ',')
  end
  return value
end

-- auth.TWO_HEADERS (Python's), word for word.
local TWO_HEADERS = 'send one credential: Authorization and x-api-key hold different ones; '
  .. 'the gateway will not pick one of them'

-- No key or JWT holds a ',': one means two credentials, and which counts is not our guess.
local function one(token, header)
  if token:find(',', 1, true) then
    return nil, string.format(ONE_CREDENTIAL, header)
  end
  return token
end

-- The token of `Authorization: Bearer …` or `x-api-key`, or nil and the 401 detail.
function _M.credential(headers)
  local authorization = joined(headers['authorization'])
  local api_key = (joined(headers['x-api-key']) or ''):match('^[ \t]*(.-)[ \t]*$')
  if authorization ~= nil then
    -- As Python's `strip(" \t").partition(" ")`: only HTTP's optional white space (space,
    -- tab) is trimmed, and the scheme ends at the first space.
    local text = authorization:match('^[ \t]*(.-)[ \t]*$')
    local space = text:find(' ', 1, true)
    local scheme = space and text:sub(1, space - 1) or text
    local token = space and text:sub(space + 1):match('^[ \t]*(.-)[ \t]*$') or ''
    if scheme:lower() ~= 'bearer' or token == '' then
      return nil, 'Authorization must be `Bearer <API key or JWT>`'
    end
    local found, detail = one(token, 'Authorization')
    -- The same key in both (some clients send it twice) is one credential; two are not.
    if found ~= nil and api_key ~= '' and api_key ~= found then
      return nil, TWO_HEADERS
    end
    return found, detail
  end
  if api_key ~= '' then
    return one(api_key, 'x-api-key')
  end
  return nil, 'no credential: send Authorization: Bearer <API key or JWT>'
end

-- The public id inside a key shaped like ours (gov_<16 hex>_<43 of A-Za-z0-9_->), else nil.
function _M.key_id(key)
  local id, secret = key:match('^gov_([0-9a-f]+)_([A-Za-z0-9_%-]+)$')
  if id == nil or #id ~= 16 or #secret ~= 43 then
    return nil
  end
  return id
end

-- A stored record, or nil when someone wrote something else there.
local function record_of(text)
  local record = cjson.decode(text)
  if type(record) ~= 'table' then
    return nil
  end
  for _, name in ipairs({'key_id', 'tenant', 'plan', 'digest'}) do
    if type(record[name]) ~= 'string' then
      return nil
    end
  end
  if record.user == cjson.null then
    record.user = nil
  end
  -- Ids go into key names: one that is not safe authenticates nobody, and neither does a
  -- user that is not a string (read as no user, it escaped the user's limits).
  if not (keys.valid_id(record.tenant) and keys.valid_id(record.plan)
      and (record.user == nil or type(record.user) == 'string' and keys.valid_id(record.user)))
  then
    ngx.log(ngx.WARN, 'governor: API key record ', record.key_id, ' unusable (tenant, plan ',
      'or user is not a safe id); it authenticates nobody')
    return nil
  end
  return record
end

local Verifier = {}
Verifier.__index = Verifier

function _M.new(store_key, secret, cache_seconds, now)
  return setmetatable({store_key = store_key, secret = secret, cache_seconds = cache_seconds,
    now = now, cache = {}, cached = 0, revoked = {}, revoked_count = 0}, Verifier)
end

function Verifier:digest(key)
  if self.secret == nil then
    return 'sha256:' .. crypto.hex(crypto.sha256(key))
  end
  return 'hmac-sha256:' .. crypto.hex(crypto.hmac_sha256(self.secret, key))
end

function Verifier:remember(record)
  self.revoked[record.key_id] = nil  -- a record restored from a backup
  if self.cache[record.key_id] == nil then
    if self.cached >= CACHE_SIZE then  -- a flood of keys: start over rather than grow
      self.cache, self.cached = {}, 0
    end
    self.cached = self.cached + 1
  end
  self.cache[record.key_id] = {at = self.now(), record = record}
end

-- KeyVerifier._forget: a key Redis no longer vouches for (revoked, or its record spoiled)
-- leaves the cache, or an outage later would serve it again; only a key once verified is
-- remembered as revoked, so made-up ids cannot fill the memory.
function Verifier:forget(key_id)
  if self.cache[key_id] == nil then
    return
  end
  self.cache[key_id], self.cached = nil, self.cached - 1
  if self.revoked_count >= CACHE_SIZE then  -- as `remember`: start over rather than grow
    self.revoked, self.revoked_count = {}, 0
  end
  self.revoked[key_id], self.revoked_count = true, self.revoked_count + 1
end

-- The record of a valid key; false for an unknown, revoked or wrong key; nil and the error
-- when Redis failed for a key not verified before (the caller decides what that means).
function Verifier:verify(client, key)
  local key_id = _M.key_id(key)
  if key_id == nil then
    return false
  end
  local entry = self.cache[key_id]
  local record
  if entry ~= nil and self.now() - entry.at <= self.cache_seconds then
    record = entry.record
  else
    local text, err = client and client:hget(self.store_key, key_id)
    if text == nil then
      if entry == nil then
        if self.revoked[key_id] then
          return false  -- Redis said so: a 401, not a 503 asking to retry
        end
        return nil, err or 'no connection'
      end
      -- Redis is away: a key verified before the outage still is; its digest is checked.
      text = cjson.encode(entry.record)
    end
    record = text ~= ngx.null and record_of(text) or nil
    if record == nil then
      self:forget(key_id)
      return false
    end
  end
  if not crypto.equal(self:digest(key), record.digest) then
    return false
  end
  self:remember(record)
  return record
end

return _M
