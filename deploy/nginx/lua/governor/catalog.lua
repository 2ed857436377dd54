-- The plan catalog `<P>:plans` the controller publishes (controller/gateway/catalog.py):
-- models, fail mode, degradation and credits per plan, and `<P>:plans:version`, cached per
-- worker and reread every `plan_refresh_seconds`. A plan it does not hold is no plan: the
-- gateway refuses it (403 unknown-plan), and everyone while no catalog is published.

local cjson = require 'cjson.safe'

local _M = {}

local null = cjson.null

local function value(x)
  if x == null then
    return nil
  end
  return x
end

-- A JSON array of non-empty strings, or nil: an empty models list means any model, so a
-- models value that is a string, null or an object must not read as one.
local function string_list(x)
  if type(x) ~= 'table' then
    return nil
  end
  local size = 0
  for _, item in pairs(x) do
    if type(item) ~= 'string' or item == '' then
      return nil
    end
    size = size + 1
  end
  return size == #x and x or nil
end

-- A JSON object (cjson gives arrays and objects alike as tables).
local function object(x)
  return type(x) == 'table' and #x == 0
end

-- A degrade spec the gateway can act on: max_tokens is formatted with %d and model is sent
-- on as the model's name, so anything else there makes the entry no plan.
local function degrade_spec(x)
  if not object(x) then
    return false
  end
  local max_tokens, model = value(x.max_tokens), value(x.model)
  local count = type(max_tokens) == 'number' and max_tokens == math.floor(max_tokens)
    and max_tokens >= 1 and max_tokens < 2 ^ 31
  return (max_tokens == nil or count) and (model == nil or type(model) == 'string')
end

-- One catalog entry (PlanSpec JSON with models, fail_mode, degrade, credits), or nil when it
-- is not one as the controller writes it (Python's PlanInfo.from_json refuses the same).
local function plan_info(text)
  local spec = cjson.decode(text)
  if type(spec) ~= 'table' or (spec.fail_mode ~= 'open' and spec.fail_mode ~= 'closed') then
    return nil
  end
  local info = {models = string_list(spec.models), fail_mode = spec.fail_mode,
    insufficient_quota = spec.quota_exhausted == 'insufficient_quota'}
  if info.models == nil then
    return nil
  end
  local degrade, credits = value(spec.degrade), value(spec.credits)
  if not (degrade == nil or degrade_spec(degrade)) or not (credits == nil or object(credits)) then
    return nil
  end
  if degrade ~= nil then
    info.degrade = {at_percent = tonumber(value(degrade.at_percent)) or 90.0,
      max_tokens = value(degrade.max_tokens), model = value(degrade.model)}
  end
  if credits ~= nil then
    info.credits = {min_balance_usd = tonumber(value(credits.min_balance_usd)) or 0.0}
  end
  return info
end

local Catalog = {}
Catalog.__index = Catalog

-- plans: nil until the catalog was read once (Redis away since start), then plan → info;
-- count: how many plans it holds (0: none published).
function _M.new(key, refresh_seconds, now)
  return setmetatable({key = key, refresh_seconds = refresh_seconds, now = now, plans = nil,
    count = 0, version = nil, loaded_at = nil}, Catalog)
end

-- Read the whole catalog and its version now; false when Redis did not answer (the last
-- good catalog is kept). An entry that is no plan is left out: it names no plan.
function Catalog:refresh(client)
  client:init_pipeline()
  client:hgetall(self.key)
  client:get(self.key .. ':version')
  local replies = client:commit_pipeline()
  if type(replies) ~= 'table' or type(replies[1]) ~= 'table' then
    return false
  end
  local plans, count, entries = {}, 0, replies[1]
  for i = 1, #entries, 2 do
    local info = plan_info(entries[i + 1])
    if info ~= nil then
      plans[entries[i]], count = info, count + 1
    end
  end
  self.plans, self.count = plans, count
  self.version = count > 0 and type(replies[2]) == 'string' and replies[2] or nil
  if count == 0 then
    self.loaded_at = nil  -- none published: read again at the next request
  end
  return true
end

-- The plan (nil: not in the catalog), rereading the catalog when the cache is older than
-- refresh_seconds. A failed read keeps the last good catalog (the admission that follows
-- reports Redis's failure itself) and waits a period before trying again. A catalog never
-- read is read by each request until one read succeeds: a request that arrives while the
-- worker's first read is still under way (a burst at start) reads it too, as catalog.py's
-- do, instead of being refused 503 as if Redis were unreachable. So does one found empty
-- (no catalog published yet): a request arriving while another reads the catalog the
-- controller has just published was refused 503 not-configured from the empty one.
function Catalog:current(client, plan)
  local now = self.now()
  local due = self.plans == nil or self.count == 0 or self.loaded_at == nil
    or now - self.loaded_at >= self.refresh_seconds
  if client ~= nil and due then
    self.loaded_at = now
    self:refresh(client)
  end
  return self.plans and self.plans[plan]
end

-- Why a plan the catalog does not hold is refused: 'unreachable' (never read), 'empty' (no
-- catalog published) or 'unknown' (not in it).
function Catalog:missing()
  if self.plans == nil then
    return 'unreachable'
  end
  return self.count == 0 and 'empty' or 'unknown'
end

-- The catalog as the start line says it: its version and size, or why there is none.
function Catalog:describe()
  if self.plans == nil then
    return 'none yet (the limit store is unreachable); every request is refused'
  end
  if self.count == 0 then
    return 'none yet (no controller has published one); every request is refused 503 '
      .. 'not-configured until it does'
  end
  return (self.version or 'unversioned') .. ' (' .. self.count .. ' plans)'
end

local function contains(list, item)
  for _, each in ipairs(list) do
    if each == item then
      return true
    end
  end
  return false
end

-- Whether the plan may call `model` (a request naming no model always may).
function _M.allows(info, model)
  return #info.models == 0 or model == nil or contains(info.models, model)
end

return _M
