-- OpenAI's Conversations API and the Responses API's calls on a stored response, as the
-- gateway serves them: controller/gateway/conversations.py, line for line. No call of them is
-- model work (none is admitted against a rate or a budget); each one naming a conversation or
-- a response is checked against the tenant's record of it, and a call the model server
-- accepted changes that record (a create makes it, an add grows it, a delete forgets it),
-- which a Responses turn naming it is admitted with.

local cjson = require 'cjson.safe'
local jsontext = require 'governor.jsontext'
local keys = require 'governor.keys'
local openai = require 'governor.openai'

local _M = {}

local ROOT = '/v1/conversations'
_M.ROOT = ROOT

-- conversations._CONVERSATION, _RESPONSE: what each shape of path serves, by method (the
-- path past the id, '*' for an item's id; HEAD as GET).
local CONVERSATION = {
  [''] = {GET = 'read', HEAD = 'read', POST = 'update', DELETE = 'delete'},
  items = {GET = 'list_items', HEAD = 'list_items', POST = 'add_items'},
  ['items/*'] = {GET = 'read_item', HEAD = 'read_item', DELETE = 'delete_item'},
}
local RESPONSE = {
  [''] = {GET = 'read', HEAD = 'read', DELETE = 'delete'},
  input_items = {GET = 'list_items', HEAD = 'list_items'},
  cancel = {POST = 'cancel'},
}
-- conversations._APIS: each API's root, what its ids name, and its calls.
local APIS = {
  {root = ROOT, what = 'conversation', actions = CONVERSATION},
  {root = '/v1/responses', what = 'response', actions = RESPONSE},
}
-- The calls whose body is read (their items count toward the record) and whose answer
-- changes the record.
_M.ADDS_ITEMS = {create = true, add_items = true}
_M.RECORDS = {create = true, add_items = true, delete = true}

-- conversations._call: the call of one API that a path's segments past its root are, or
-- 'unserved'.
local function call_of(api, method, rest)
  local parts = {}
  for part in (rest .. '/'):gmatch('([^/]*)/') do
    if part == '' or part == '.' or part == '..' then
      return 'unserved'
    end
    parts[#parts + 1] = part
  end
  local shape = parts[2] or ''
  for _ = 3, #parts do
    shape = shape .. '/*'
  end
  local action = api.actions[shape] and api.actions[shape][method]
  if action == nil or (#parts == 3 and not keys.valid_id(parts[3])) then
    return 'unserved'
  end
  if not keys.valid_id(parts[1]) then
    return {action = action, named = parts[1], what = api.what}
  end
  return {action = action, id = parts[1], what = api.what}
end

-- conversations.route: {action, id (nil: a create, or an id that is no safe id), named (the
-- path's id then), what ('conversation' or 'response')}; 'unserved' for a path under the APIs
-- that no call of them is; nil for a path outside them (POST /v1/responses: a model call).
function _M.route(method, path)
  if path == ROOT then
    return method == 'POST' and {action = 'create', what = 'conversation'} or 'unserved'
  end
  for _, api in ipairs(APIS) do
    if path:sub(1, #api.root + 1) == api.root .. '/' then
      return call_of(api, method, path:sub(#api.root + 2))
    end
  end
  return nil
end

-- conversations.added_tokens: the estimate of the items a create or an add sends, or nil and
-- the message for a 400.
function _M.added_tokens(raw)
  local body, problem = openai.read_object(raw)
  if body == nil then
    return nil, problem
  end
  local items = body.items
  if items == nil or items == cjson.null then
    return 0
  end
  if type(items) ~= 'table' or not jsontext.member(raw, 'items'):match('^%[') then
    return nil, '`items` must be a list of conversation items'
  end
  return openai.item_tokens(items) + openai.MESSAGE_OVERHEAD_TOKENS * #items
end

-- conversations.created_id: the id of the conversation a create's answer holds, or nil.
function _M.created_id(answer)
  local document = cjson.decode(answer or '')
  if type(document) ~= 'table' or document.object ~= 'conversation' then
    return nil
  end
  return type(document.id) == 'string' and document.id or nil
end

local FINAL_STATUSES = openai.FINAL_STATUSES

-- background.MAX_READ_ANSWER: the largest answer read for what it records (a settling read's
-- usage: a response object holds its whole output; a created conversation's id); a larger one
-- records nothing (gateway.lua's `readable`).
_M.MAX_READ_ANSWER = 32 * 1024 * 1024

-- background._count: a whole count of 0 or more (cjson reads every JSON number as a double;
-- one past 2^53 is no exact count).
local function count(value)
  return type(value) == 'number' and value >= 0 and value == math.floor(value)
    and value < 2 ^ 53
end

-- background.cancelled_usage: a response cancelled and answered without usage, as an answer
-- without usage is settled: the prompt charged at admission and the output it holds
-- (openai.output_tokens), never more than its reservation nor less than its prompt. nil (the
-- whole reservation stays charged) for an output without text: vLLM and SGLang answer a
-- cancel with the object stored at queue time (`output: []`, `usage: null`) however much
-- was generated, and that estimate made any generation cost its prompt alone.
local function cancelled_usage(response, charged)
  local generated = openai.output_tokens(response)
  if generated == 0 then
    return nil
  end
  return {prompt = charged.prompt, completion = math.min(generated, charged.completion)}
end

-- background._usage: the usage {prompt, completion} a finished response object reports;
-- nil for none or counts that are none.
local function usage_of(document)
  local usage = document.usage
  if type(usage) ~= 'table' then
    return nil
  end
  local prompt, completion, total = usage.input_tokens, usage.output_tokens, usage.total_tokens
  if not count(prompt) or not count(completion) then
    return nil
  end
  if count(total) and total > prompt + completion then
    completion = total - prompt  -- reasoning tokens counted only in the total, as a settle
  end
  return {prompt = prompt, completion = completion}
end

-- background.ENDED: what a cancel that ended a response leaves in its charge record's place
-- when it finds none (no charge decodes from it), for a streamed create settling after it.
_M.ENDED = 'ended'

-- background._final_response: the response object `response_id` an answer holds, when its
-- `status` is final; nil otherwise.
-- background._response: the response object `response_id` an answer holds, with a string
-- `status`.
local function response_of(answer, response_id)
  local document = cjson.decode(answer or '')
  if type(document) ~= 'table' or document.object ~= 'response' then
    return nil
  end
  if document.id ~= response_id or type(document.status) ~= 'string' then
    return nil
  end
  return document
end

local function final_response(answer, response_id)
  local document = response_of(answer, response_id)
  if document == nil or not FINAL_STATUSES[document.status] then
    return nil
  end
  return document
end

-- background.running: whether an answer holds response `response_id` still generating.
local RUNNING_STATUSES = {queued = true, in_progress = true}
function _M.running(answer, response_id)
  local document = response_of(answer, response_id)
  return document ~= nil and RUNNING_STATUSES[document.status] == true
end

-- background.ended: whether an answer holds response `response_id` finished.
function _M.ended(answer, response_id)
  return final_response(answer, response_id) ~= nil
end

-- background.finished: whether an answer holds response `response_id` finished (its
-- generation holds no slot any more), and the usage it reports then (nil: none); one
-- `cancelled` with no usage at all (null or absent): cancelled_usage (`charged`: its charge;
-- nil without output text).
function _M.finished(answer, response_id, charged)
  local document = final_response(answer, response_id)
  if document == nil then
    return false, nil
  end
  local usage = document.usage
  if (usage == nil or usage == cjson.null) and document.status == 'cancelled' then
    return true, cancelled_usage(document, charged)
  end
  return true, usage_of(document)
end

local function text_or_nil(value)
  if value == nil or value == cjson.null then
    return true, nil
  end
  return type(value) == 'string', value
end

-- background.BackgroundCharge.decoded: what a background answer was charged, from its record
-- ({request_id, plan, user, ip, model, prompt, completion, cost_micro, day}); nil for a value
-- no gateway writes (the reservation then stays charged).
function _M.background_charge(text)
  local fields = cjson.decode(text or '')
  if type(fields) ~= 'table' then
    return nil
  end
  local ok_user, user = text_or_nil(fields.user)
  local ok_ip, ip = text_or_nil(fields.ip)
  local money = fields.cost_micro
  if money == cjson.null then
    money = nil
  end
  if type(fields.request_id) ~= 'string' or type(fields.plan) ~= 'string'
      or type(fields.model) ~= 'string' or not ok_user or not ok_ip
      or not (count(fields.prompt) and count(fields.completion) and count(fields.day))
      or not (money == nil or count(money)) then
    return nil
  end
  return {request_id = fields.request_id, plan = fields.plan, user = user, ip = ip,
    model = fields.model, prompt = fields.prompt, completion = fields.completion,
    cost_micro = money, day = fields.day}
end

-- What a background answer was charged as its record holds it (background.encoded).
function _M.background_record(charged)
  local function or_null(value)
    if value == nil then
      return cjson.null
    end
    return value
  end
  return cjson.encode({request_id = charged.request_id, plan = charged.plan,
    user = or_null(charged.user), ip = or_null(charged.ip), model = charged.model,
    prompt = charged.prompt, completion = charged.completion,
    cost_micro = or_null(charged.cost_micro), day = charged.day})
end

return _M
