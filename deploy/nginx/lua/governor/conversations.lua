-- OpenAI's Conversations API as the gateway serves it: controller/gateway/conversations.py,
-- line for line. No call of it is model work (none is admitted against a rate or a budget);
-- each one naming a conversation is checked against the tenant's record of it, and a call the
-- model server accepted changes that record (a create makes it, an add grows it, a delete
-- forgets it), which a Responses turn in the conversation is admitted with.

local cjson = require 'cjson.safe'
local jsontext = require 'governor.jsontext'
local keys = require 'governor.keys'
local openai = require 'governor.openai'

local _M = {}

local ROOT = '/v1/conversations'
_M.ROOT = ROOT

-- conversations._ACTIONS: what each shape of path serves, by method (HEAD as GET).
local ACTIONS = {
  [1] = {GET = 'read', HEAD = 'read', POST = 'update', DELETE = 'delete'},
  [2] = {GET = 'list_items', HEAD = 'list_items', POST = 'add_items'},
  [3] = {GET = 'read_item', HEAD = 'read_item', DELETE = 'delete_item'},
}
-- The calls whose body is read (their items count toward the record) and whose answer
-- changes the record.
_M.ADDS_ITEMS = {create = true, add_items = true}
_M.RECORDS = {create = true, add_items = true, delete = true}

-- conversations.route: {action, conversation (nil: a create, or an id that is no safe id),
-- named (the path's id then)}; 'unserved' for a path under the API that no call of it is;
-- nil for a path outside it.
function _M.route(method, path)
  if path == ROOT then
    return method == 'POST' and {action = 'create'} or 'unserved'
  end
  if path:sub(1, #ROOT + 1) ~= ROOT .. '/' then
    return nil
  end
  local parts = {}
  for part in (path:sub(#ROOT + 2) .. '/'):gmatch('([^/]*)/') do
    if part == '' or part == '.' or part == '..' then
      return 'unserved'
    end
    parts[#parts + 1] = part
  end
  local action = ACTIONS[#parts] and ACTIONS[#parts][method]
  if action == nil or (#parts > 1 and parts[2] ~= 'items') then
    return 'unserved'
  end
  if #parts == 3 and not keys.valid_id(parts[3]) then
    return 'unserved'
  end
  if not keys.valid_id(parts[1]) then
    return {action = action, named = parts[1]}
  end
  return {action = action, conversation = parts[1]}
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

return _M
