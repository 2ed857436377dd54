-- The limits one request is checked against (controller/gateway/limits.py): resolved from the
-- limit hashes by the contract's lookup rule and kept per worker until `<P>:version` moves;
-- admit.lua takes them as arguments and checks only the version.

local _M = {}

local KINDS = {'requests_per_second', 'requests_per_minute', 'tokens_per_minute',
  'tokens_per_day', 'concurrent_requests', 'max_tokens_per_request', 'concurrent_headroom',
  'concurrent_weight'}
-- admit.lua's letter for each kind it checks (upper case: the model's own value).
local LETTERS = {requests_per_second = 's', requests_per_minute = 'm', tokens_per_minute = 't',
  tokens_per_day = 'd', concurrent_requests = 'c'}
_M.PERIOD_MS = {requests_per_second = 1000, requests_per_minute = 60000,
  tokens_per_minute = 60000}
-- A request above one of these can never fit (400 too_large): no wait helps it.
local SIZED = {max_tokens_per_request = true, tokens_per_minute = true, tokens_per_day = true}
local MAX_ENTRIES = 65536
local MAX_AGE_SECONDS = 60  -- limits.LimitCache: a version number can come back after a loss

-- A stored value as a number; nil unless it is a plain, finite decimal >= 0 (limits._number).
local function number(text)
  if type(text) ~= 'string' then
    return nil
  end
  local mantissa, exponent = text:match('^%s*([-+]?[%d.]+)([eE]?[-+]?%d*)%s*$')
  if not mantissa or not (mantissa:match('^[-+]?%d+%.?%d*$') or mantissa:match('^[-+]?%.%d+$'))
      or not (exponent == '' or exponent:match('^[eE][-+]?%d+$')) then
    return nil
  end
  local value = tonumber(mantissa .. exponent)
  if value == nil or value < 0 or value == math.huge then
    return nil
  end
  return value
end

local function trimmed(text)
  return text:match('^%s*(.-)%s*$')
end

-- The sharing terms (model.py's _SHARE_TERMS): the level owners they may stand at and their
-- range; anywhere else, for one model, or out of range, they shed (limits._misplaced).
local TERMS = {
  concurrent_headroom = {owners = {['global/'] = true}, low = 0.001, high = 1},
  concurrent_weight = {owners = {['tenant/'] = true}, low = 0.001, high = 1000000},
}

local function misplaced(owner, kind, value, scoped)
  local term = TERMS[kind]
  if not term then
    return false
  end
  local placed = term.owners[owner] or term.owners[owner:match('^[^/]+/')]
  return scoped or not placed or value < term.low or value > term.high
end

-- limits._Found.share: with a global headroom and global concurrent_requests, the f check
-- after the global level's others (its value: headroom, the tenant's weight, the tenant).
local function share(checks, letters, headroom, weight, tenant_owner)
  if not headroom or tenant_owner == '' or not letters[1]:find('c', 1, true) then
    return
  end
  table.insert(checks, #letters[1] + 1, {address = headroom.address, kind = headroom.kind,
    text = trimmed(headroom.text) .. ' ' .. weight .. ' ' .. tenant_owner,
    value = headroom.value})
  letters[1] = letters[1] .. 'f'
end

-- limits.resolve: `levels` = per level (global, ip, tenant, user) {owner ('' absent), its
-- hashes (field → value) in lookup order}; the tenant's second hash is its plan's.
function _M.resolve(version, levels, plan_owner, model)
  local fields = {}
  for _, kind in ipairs(KINDS) do
    if model ~= '' then
      fields[#fields + 1] = {kind, kind .. '@' .. model, true}
    end
    fields[#fields + 1] = {kind, kind, false}
  end
  local checks, sized, letters = {}, {}, {}
  local headroom, weight = nil, '1'
  for l, level in ipairs(levels) do
    local owner, found, level_letters = level[1], {}, {}
    for position, values in ipairs(level[2]) do
      if owner ~= '' and next(values) ~= nil then
        for _, field in ipairs(fields) do
          local kind, name = field[1], field[2]
          local text = values[name]
          local value = number(text)
          -- A 0 sheds; so does a value Governor never writes (abc, -1, 1e400, a sharing term
          -- out of its place or range): ignoring it served that traffic with no limit at
          -- all until drift repair (fail closed).
          if text ~= nil and (value == nil or value == 0
              or misplaced(owner, kind, value, field[3])) then
            return {version = version, letters = '', checks = {}, limits = {}, sized = sized,
              shed = (position == 2 and plan_owner or owner) .. name}
          end
          if value ~= nil and not found[kind] then
            found[kind] = true
            if SIZED[kind] then
              sized[#sized + 1] = {value, owner .. name}
            end
            -- Sharing terms reach here only where they belong (else they shed).
            if kind == 'concurrent_headroom' then
              headroom = {address = owner .. name, kind = kind, text = text, value = value}
            elseif kind == 'concurrent_weight' then
              weight = trimmed(text)
            end
            local letter = LETTERS[kind]
            if letter then
              checks[#checks + 1] = {address = owner .. name, kind = kind, text = text,
                value = value}
              level_letters[#level_letters + 1] = field[3] and letter:upper() or letter
            end
          end
        end
      end
    end
    letters[l] = table.concat(level_letters)
  end
  share(checks, letters, headroom, weight, levels[3] and levels[3][1] or '')
  local limits = {}
  for i, check in ipairs(checks) do
    limits[i] = check.text
  end
  return {version = version, letters = table.concat(letters, '/'), checks = checks,
    limits = limits, sized = sized}
end

-- limits.Resolved.fitted: `tokens` lowered to the smallest size limit, never below `least`.
function _M.fitted(resolved, tokens, least)
  local room = tokens
  for _, gate in ipairs(resolved.sized) do
    room = math.min(room, math.floor(gate[1]))
  end
  return math.max(least, room)
end

-- too_large or shed (outcome, address) when the limits alone decide, else nil.
function _M.verdict(resolved, tokens)
  for _, gate in ipairs(resolved.sized) do
    if tokens > gate[1] then
      return 'too_large', gate[2]
    end
  end
  if resolved.shed then
    return 'shed', resolved.shed
  end
  return nil
end

-- What admit.lua's check number names: nil for 0, the tenant's credits for -1.
function _M.address(resolved, check, tenant)
  if check < 0 then
    return 'credits/' .. tenant
  end
  local found = resolved.checks[check]
  return found and found.address or nil
end

local Cache = {}
Cache.__index = Cache

-- One per worker: keys is governor.keys for the prefix.
function _M.new(keys)
  return setmetatable({keys = keys, version = nil, entries = {}, size = 0}, Cache)
end

local function hash(reply)
  local values = {}
  if type(reply) == 'table' then
    for i = 1, #reply, 2 do
      values[reply[i]] = reply[i + 1]
    end
  end
  return values
end

-- The request's resolution (tenant, plan, user '' none, ip '' none, model '' none), read with
-- the version in one MULTI when none is kept. Returns it, or nil and why.
function Cache:get(client, tenant, plan, user, ip, model)
  local id = table.concat({tenant, plan, user, ip ~= '' and '1' or '', model}, '\0')
  local found = self.entries[id]
  local now = ngx.now()
  if found and now - found.read_at <= MAX_AGE_SECONDS then
    return found
  end
  local owners = self.keys:limit_hashes(tenant, plan, user, ip)
  client:init_pipeline()
  client:multi()
  client:get(self.keys:version())
  for _, owner in ipairs(owners) do
    for _, key in ipairs(owner[2]) do
      client:hgetall(key)
    end
  end
  client:exec()
  local replies, err = client:commit_pipeline()
  local read = type(replies) == 'table' and replies[#replies]
  if type(read) ~= 'table' or read[1] == false then
    return nil, 'reading the limits: ' .. tostring(err or (read and read[2]) or 'no answer')
  end
  local version = read[1] == ngx.null and '' or tostring(read[1])
  local levels, n = {}, 1
  for l, owner in ipairs(owners) do
    local hashes = {}
    for i = 1, #owner[2] do
      n = n + 1
      hashes[i] = hash(read[n])
    end
    levels[l] = {owner[1], hashes}
  end
  found = _M.resolve(version, levels, 'plan/' .. plan .. '/', model)
  found.read_at = now
  if version == '' then
    return found  -- nothing written yet: kept, it would outlive the controller's first write
  end
  if version ~= self.version or self.size >= MAX_ENTRIES then
    self.entries, self.size, self.version = {}, 0, version  -- a bound, not an LRU
  end
  if self.entries[id] == nil then
    self.size = self.size + 1
  end
  self.entries[id] = found
  return found
end

-- admit.lua answered 'stale': every resolution older than `version` goes.
function Cache:stale(version)
  if version ~= self.version then
    self.entries, self.size, self.version = {}, 0, nil
  end
end

return _M
