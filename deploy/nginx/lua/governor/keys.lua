-- Redis key names of docs/redis-contract.md, built exactly as controller/clients/scripts.py
-- and controller/contract/keys.py build them (same ids, same escapes, same hash tags).

local _M = {}

local find, gsub, sub, format = string.find, string.gsub, string.sub, string.format

-- controller.model.validate_id: 1-128 of A-Z a-z 0-9 ._:+=~- starting with a letter or digit.
function _M.valid_id(value)
  return type(value) == 'string' and #value >= 1 and #value <= 128
    and find(value, '^[A-Za-z0-9][A-Za-z0-9._:+=~%-]*$') ~= nil
end

-- escape_id: ':' is the key separator, so an id writes it as '%3A'.
local function escape(value)
  return (gsub(value, ':', '%%3A'))
end
_M.escape = escape

-- Eight 16-bit groups of an IPv6 address (an embedded IPv4 tail allowed), or nil.
local function ipv6_groups(text)
  local head, tail = text, nil
  local double = find(text, '::', 1, true)
  if double then
    head, tail = sub(text, 1, double - 1), sub(text, double + 2)
    if find(tail, '::', 1, true) then
      return nil
    end
  end
  local function parse(part, allow_v4)
    local groups = {}
    if part == '' then
      return groups
    end
    local pieces = {}
    for piece in (part .. ':'):gmatch('([^:]*):') do
      pieces[#pieces + 1] = piece
    end
    for i, piece in ipairs(pieces) do
      if allow_v4 and i == #pieces and find(piece, '.', 1, true) then
        local a, b, c, d = piece:match('^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
        a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
        if not (a and a < 256 and b < 256 and c < 256 and d < 256) then
          return nil
        end
        groups[#groups + 1] = a * 256 + b
        groups[#groups + 1] = c * 256 + d
      elseif find(piece, '^%x%x?%x?%x?$') then
        groups[#groups + 1] = tonumber(piece, 16)
      else
        return nil
      end
    end
    return groups
  end
  local first = parse(head, tail == nil)
  local last = tail and parse(tail, true) or {}
  if not first or not last then
    return nil
  end
  local missing = 8 - #first - #last
  if (double and missing < 1) or (not double and missing ~= 0) then
    return nil
  end
  local groups = first
  for _ = 1, missing do
    groups[#groups + 1] = 0
  end
  for _, group in ipairs(last) do
    groups[#groups + 1] = group
  end
  return groups
end

-- scripts.ip_id: IPv4 as is, IPv6 by its /64 ('2001:0db8:0000:0001::'), an IPv4-mapped
-- IPv6 address as its IPv4. nil when `text` is no address.
function _M.ip_id(text)
  if type(text) ~= 'string' then
    return nil
  end
  text = text:match('^%s*(.-)%s*$')
  local a, b, c, d = text:match('^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
  if a then
    local parts = {tonumber(a), tonumber(b), tonumber(c), tonumber(d)}
    for i, part in ipairs(parts) do
      -- Python's ipaddress refuses leading zeros (they once meant octal).
      local written = ({a, b, c, d})[i]
      if part > 255 or (#written > 1 and sub(written, 1, 1) == '0') then
        return nil
      end
    end
    return format('%d.%d.%d.%d', parts[1], parts[2], parts[3], parts[4])
  end
  local groups = not find(text, '%', 1, true) and ipv6_groups(text)  -- zones: refused too
  if not groups then
    return nil
  end
  if groups[1] == 0 and groups[2] == 0 and groups[3] == 0 and groups[4] == 0
      and groups[5] == 0 and groups[6] == 0xffff then
    return format('%d.%d.%d.%d', math.floor(groups[7] / 256), groups[7] % 256,
      math.floor(groups[8] / 256), groups[8] % 256)
  end
  return format('%04x:%04x:%04x:%04x::', groups[1], groups[2], groups[3], groups[4])
end

local Keys = {}
Keys.__index = Keys

-- The keys of one deployment (one prefix).
function _M.new(prefix)
  return setmetatable({prefix = prefix}, Keys)
end

function Keys:tag(tenant)
  return self.prefix .. ':{t:' .. escape(tenant) .. '}'
end

function Keys:api_keys()
  return self.prefix .. ':apikeys'
end

function Keys:plans()
  return self.prefix .. ':plans'
end

function Keys:credits(tenant)
  return self:tag(tenant) .. ':credits'
end

-- The (state, leases) keys of the 4 levels, absent levels standing in with the tenant's.
function Keys:levels(tenant, user, ip)
  local tenant_state = self:tag(tenant) .. ':enforce'
  local states = {
    self.prefix .. ':enforce:global',
    ip ~= '' and (self.prefix .. ':enforce:ip:' .. escape(ip)) or tenant_state,
    tenant_state,
    user ~= '' and (self:tag(tenant) .. ':user:' .. escape(user) .. ':enforce') or tenant_state,
  }
  local keys = {}
  for i, state in ipairs(states) do
    keys[2 * i - 1], keys[2 * i] = state, state .. ':leases'
  end
  return keys
end

-- KeySchema.response: the tokens a request naming `response_id` as its previous_response_id
-- makes the model server read again, recorded for `tenant` under its tag. nil for an id that
-- is no safe id: it is never put in a key.
function Keys:response(tenant, response_id)
  if not _M.valid_id(response_id) then
    return nil
  end
  return self:tag(tenant) .. ':response:' .. escape(response_id)
end

-- KeySchema.conversation: as Keys:response, for a Conversations API id the tenant's answers
-- belonged to (its own kind: a conversation and a response sharing an id never meet).
function Keys:conversation(tenant, conversation_id)
  if not _M.valid_id(conversation_id) then
    return nil
  end
  return self:tag(tenant) .. ':conversation:' .. escape(conversation_id)
end

-- KeySchema.background: what the tenant's background Responses answer `response_id` was
-- charged when answered, until a read of it finished settles it at its usage. nil for an id
-- that is no safe id.
function Keys:background(tenant, response_id)
  if not _M.valid_id(response_id) then
    return nil
  end
  return self:tag(tenant) .. ':background:' .. escape(response_id)
end

function Keys:version()
  return self.prefix .. ':version'
end

-- The limit hashes admission reads, per level (global, ip, tenant, user): {owner ('' when
-- the level is absent), its hashes in lookup order (the tenant's, then its plan's)}.
function Keys:limit_hashes(tenant, plan, user, ip)
  local tag = self:tag(tenant)
  return {
    {'global/', {self.prefix .. ':limits:global'}},
    ip ~= '' and {'ip/', {self.prefix .. ':limits:ip'}} or {'', {}},
    {'tenant/' .. tenant .. '/',
      {tag .. ':limits', self.prefix .. ':limits:plan:' .. escape(plan)}},
    user ~= '' and {'user/' .. tenant .. '/' .. user .. '/',
      {tag .. ':user:' .. escape(user) .. ':limits'}} or {'', {}},
  }
end

-- The 10 keys of admit.lua (`user` and `ip` are '' when absent; `ip` as ip_id gives it).
function Keys:admit_keys(tenant, user, ip)
  local keys = {self:version()}
  for _, key in ipairs(self:levels(tenant, user, ip)) do
    keys[#keys + 1] = key
  end
  keys[#keys + 1] = self:credits(tenant)
  return keys
end

-- EnforcementKeys.charge_keys: the 7 keys of charge.lua (each level's state, the credits and
-- their history, then the request's charge record beside the tenant's state).
function Keys:charge_keys(tenant, user, ip, request_id)
  local levels = self:levels(tenant, user, ip)
  return {levels[1], levels[3], levels[5], levels[7], self:credits(tenant),
    self:credits(tenant) .. ':history', levels[5] .. ':charged:' .. request_id}
end

-- The 10 keys of settle.lua.
function Keys:settle_keys(tenant, user, ip)
  local keys = self:levels(tenant, user, ip)
  keys[#keys + 1] = self:credits(tenant)
  keys[#keys + 1] = self:credits(tenant) .. ':history'
  return keys
end

return _M
