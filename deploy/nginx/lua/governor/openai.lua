-- The OpenAI wire format, as controller/gateway/openai.py reads it: what a request may spend
-- at most (prompt estimate + max_tokens × n × prompts), and what its answer says it spent.

local cjson = require 'cjson.safe'
local jsontext = require 'governor.jsontext'

local _M = {}

_M.ROUTES = {
  ['/v1/chat/completions'] = 'chat',
  ['/v1/completions'] = 'completion',
  ['/v1/embeddings'] = 'embedding',
  ['/v1/responses'] = 'response',  -- OpenAI's Responses API (the SDK's client.responses; vLLM)
}
-- openai.MAX_TOKENS_NAMES: where each route reads its output cap. A completions request has
-- no `max_completion_tokens` (a model server ignores it and generates up to `max_tokens`).
local MAX_TOKENS_NAMES = {
  chat = {'max_completion_tokens', 'max_tokens'},
  completion = {'max_tokens'},
  embedding = {},
  response = {'max_output_tokens'},
}
local CHARS_PER_TOKEN = 4
local MESSAGE_OVERHEAD_TOKENS = 4
local MAX_BUFFERED_RESPONSE = 32 * 1024 * 1024

local function text_tokens(text)
  return math.ceil(jsontext.length(text) / CHARS_PER_TOKEN)
end

-- cjson reads JSON numbers as doubles: 1e30 or 1e400 (infinity) is "integral" too. An
-- infinity is no count (as in Python, where it is a float), and a reservation is capped at
-- 2^53, the largest count a double holds exactly: past it string.format('%d') wrapped to a
-- negative reservation and admitted the request.
local MAX_EXACT_COUNT = 2 ^ 53

local function is_int(value)
  return type(value) == 'number' and value == math.floor(value)
    and value > -math.huge and value < math.huge
end

-- Tokens of any text-bearing JSON: strings by length, token ids one each, `role` skipped.
local function tokens(value)
  local kind = type(value)
  if kind == 'string' then
    return text_tokens(value)
  elseif kind == 'number' then
    return 1
  elseif kind == 'table' then
    local total = 0
    for key, item in pairs(value) do
      if key ~= 'role' then
        total = total + tokens(item)
      end
    end
    return total
  end
  return 0
end

-- openai._response_tokens: `input` (a text, or items counted as chat messages; an object has
-- no length here, as in Python) and `instructions`, and the tool and output-format schemas.
local function response_tokens(body)
  local items = body.input
  local total = tokens(items) + tokens(body.instructions)
  if type(items) == 'table' then
    total = total + MESSAGE_OVERHEAD_TOKENS * #items
  end
  for _, extra in ipairs({'tools', 'text'}) do
    if body[extra] ~= nil then
      total = total + math.ceil(jsontext.dumps_length(body[extra]) / CHARS_PER_TOKEN)
    end
  end
  return total
end

local function prompt_tokens(kind, body)
  if kind == 'chat' then
    local messages = body.messages
    if type(messages) ~= 'table' or messages[1] == nil then
      return nil, 'a chat request needs a non-empty `messages` list'
    end
    local total = 0
    for _, message in ipairs(messages) do
      total = total + MESSAGE_OVERHEAD_TOKENS + tokens(message)
    end
    for _, extra in ipairs({'tools', 'functions', 'response_format'}) do
      if body[extra] ~= nil then  -- tool schemas are read by the model too
        total = total + math.ceil(jsontext.dumps_length(body[extra]) / CHARS_PER_TOKEN)
      end
    end
    return total
  end
  local name = kind == 'completion' and 'prompt' or 'input'
  if body[name] == nil then
    return nil, 'a ' .. kind .. ' request needs `' .. name .. '`'
  end
  if kind == 'response' then
    return response_tokens(body)
  end
  return tokens(body[name])
end

-- openai._check_previous: `previous_response_id` must be a string (or null); a model server
-- reading another JSON value as an id would bill a conversation no reservation counted.
-- `conversation` a string or an object whose `id` is one (or null): one the gateway never
-- checked was the tenant's must not reach the model server either.
local function bad_previous(kind, body)
  if kind ~= 'response' then
    return nil
  end
  local value = body.previous_response_id
  if value ~= nil and value ~= cjson.null and type(value) ~= 'string' then
    local shown = cjson.encode(value) or tostring(value)
    return '`previous_response_id` must be a string, not ' .. shown:sub(1, 40)
  end
  value = body.conversation
  local named = type(value) == 'table' and value.id or value
  if value ~= nil and value ~= cjson.null and type(named) ~= 'string' then
    return '`conversation` must be a string or an object with a string `id`'
  end
  return nil
end

local COUNTS = {'max_tokens', 'max_completion_tokens', 'max_output_tokens', 'n', 'best_of'}

-- A count the client sent must be a positive integer (the Python gateway's check; OpenAI's
-- API requires it): NaN, Infinity or a string is a 400, never read as absent and replaced by
-- the gateway's default. (cjson reads 1e30 as the integer it equals; it then meets the budget.)
local function bad_count(body)
  for _, name in ipairs(COUNTS) do
    local value = body[name]
    if value ~= nil and value ~= cjson.null and not (is_int(value) and value >= 1) then
      local shown = cjson.encode(value) or tostring(value)
      return '`' .. name .. '` must be a positive integer, not ' .. shown:sub(1, 40)
    end
  end
  return nil
end

-- `stream` must be a JSON boolean or null (the Python gateway's check): a model server reads 1
-- or "true" as true and streams, which was settled as a broken JSON answer of 0 tokens.
local function bad_stream(kind, body)
  local value = body.stream
  if kind ~= 'embedding' and value ~= nil and value ~= cjson.null and type(value) ~= 'boolean'
  then
    local shown = cjson.encode(value) or tostring(value)
    return '`stream` must be true or false, not ' .. shown:sub(1, 40)
  end
  return nil
end

-- The first byte (from 1) of `text` that is no part of well-formed UTF-8 (RFC 3629: no
-- overlong forms, surrogates or code points past U+10FFFF, as Python's codec), or nil.
-- lua-cjson passes any byte inside a string: unchecked, a latin-1 body went to the model
-- server, where the Python gateway refuses it.
local function bad_utf8(text)
  local i = 1
  while true do
    i = text:find('[\128-\255]', i)  -- ASCII runs are skipped at C speed
    if i == nil then
      return nil
    end
    local c = text:byte(i)
    local size, low, high = 0, 0x80, 0xbf  -- the second byte's range
    if c >= 0xc2 and c <= 0xdf then
      size = 2
    elseif c >= 0xe0 and c <= 0xef then
      size = 3
      low = c == 0xe0 and 0xa0 or low
      high = c == 0xed and 0x9f or high
    elseif c >= 0xf0 and c <= 0xf4 then
      size = 4
      low = c == 0xf0 and 0x90 or low
      high = c == 0xf4 and 0x8f or high
    else
      return i
    end
    for k = 1, size - 1 do
      local b = text:byte(i + k)
      if b == nil or b < (k == 1 and low or 0x80) or b > (k == 1 and high or 0xbf) then
        return i
      end
    end
    i = i + size
  end
end

-- openai.not_utf8 (Python's wording): `at` counts from 1, Python's offset from 0.
local function not_utf8(at)
  return 'the request body is not UTF-8 (byte ' .. (at - 1) .. ' is not): send JSON encoded '
    .. 'in UTF-8'
end

-- openai._check_model: a model name becomes a key of the limit cache (and, on the Python
-- gateway, a metric label), so it is 1-256 characters (of UTF-8, checked above) with no
-- control character (C0, DEL, C1: U+0080-U+009F is \194\128-\194\159).
local MODEL_REQUEST_MAX = 256
local BAD_MODEL = '`model` must be 1-' .. MODEL_REQUEST_MAX .. ' characters and hold no '
  .. 'control character (U+0000-U+001F, U+007F-U+009F)'

local function bad_model(model)
  if #model > MODEL_REQUEST_MAX then
    local _, continuation = model:gsub('[\128-\191]', '')
    if #model - continuation > MODEL_REQUEST_MAX then
      return true
    end
  end
  return model:find('[%z\1-\31\127]') ~= nil or model:find('\194[\128-\159]') ~= nil
end

local Request = {}
Request.__index = Request

-- openai.read_object: a body of UTF-8 JSON holding one object that names no member twice, or
-- nil and the message for a 400 (the Python gateway's wording).
function _M.read_object(raw)
  local bad = bad_utf8(raw)
  if bad ~= nil then
    return nil, not_utf8(bad)
  end
  local body, err = cjson.decode(raw)
  if body == nil then
    return nil, 'the request body is not JSON: ' .. tostring(err)
  end
  if type(body) ~= 'table' or raw:match('^%s*(.)') ~= '{' then
    return nil, 'the request body must be a JSON object'
  end
  local twice = jsontext.twice(raw)
  if twice ~= nil then  -- openai.named_twice's wording
    return nil, 'the request body names `' .. twice .. '` twice: send each member '
      .. 'once (which one a model server reads differs, so the one checked here may not be '
      .. 'the one it runs)'
  end
  return body
end

-- openai.item_tokens: conversation items' texts, counted as a Responses request's input items
-- (without their per-item overhead, MESSAGE_OVERHEAD_TOKENS).
function _M.item_tokens(items)
  return tokens(items)
end
_M.MESSAGE_OVERHEAD_TOKENS = MESSAGE_OVERHEAD_TOKENS

-- One request body, or nil and the message for a 400 (the Python gateway's wording).
function _M.parse(kind, raw, default_max_tokens)
  local body, problem = _M.read_object(raw)
  if body == nil then
    return nil, problem
  end
  if type(body.model) ~= 'string' or body.model == '' then
    return nil, 'the request names no model (`model` must be a string)'
  end
  if bad_model(body.model) then
    return nil, BAD_MODEL
  end
  local wrong = bad_count(body) or bad_stream(kind, body) or bad_previous(kind, body)
  if wrong then
    return nil, wrong
  end
  local prompt, problem = prompt_tokens(kind, body)
  if not prompt then
    return nil, problem
  end
  local request = setmetatable(
    {kind = kind, raw = raw, body = body, prompt_tokens = prompt, changed = false}, Request)
  if kind ~= 'embedding' and request:max_tokens() == nil then
    request:set_max_tokens(default_max_tokens)
    request.defaulted = true  -- the gateway's default, not the client's
  end
  return request
end

function Request:model()
  return self.body.model
end

-- The earlier response a Responses request continues (the model server reads it back from
-- its own store and bills it as this request's input), or nil.
function Request:previous_response_id()
  local value = self.kind == 'response' and self.body.previous_response_id or nil
  return type(value) == 'string' and value or nil
end

-- ModelRequest.conversation_id: the Conversations API conversation a Responses request
-- belongs to (its id, or an object holding it), or nil.
function Request:conversation_id()
  local value = self.kind == 'response' and self.body.conversation or nil
  if type(value) == 'table' then
    value = value.id
  end
  return type(value) == 'string' and value or nil
end

-- ModelRequest.earlier: {what, id} of each earlier response or conversation named, in order.
function Request:earlier()
  local named = {}
  local response, conversation = self:previous_response_id(), self:conversation_id()
  if response ~= nil then
    named[#named + 1] = {'response', response}
  end
  if conversation ~= nil then
    named[#named + 1] = {'conversation', conversation}
  end
  return named
end

-- ModelRequest.background: whether the model server runs this Responses request in the
-- background (it answers at once, queued and without usage, and generates afterwards).
function Request:background()
  return self.kind == 'response' and self.body.background == true
end

-- Whether the model server keeps this Responses answer for a later request to name (`store`,
-- true by default).
function Request:stored()
  return self.kind == 'response' and self.body.store ~= false
end

-- Count the earlier conversation into the prompt: the reservation (and an estimated settle)
-- holds it (ModelRequest.add_earlier).
function Request:add_earlier(tokens)
  self.prompt_tokens = self.prompt_tokens + tokens
end

function Request:streaming()
  return self.kind ~= 'embedding' and self.body.stream == true
end

-- The output cap the route's model server reads; with both chat names, the larger (servers
-- differ in which one wins, and the reservation is the worst case).
function Request:max_tokens()
  local most = nil
  for _, name in ipairs(MAX_TOKENS_NAMES[self.kind]) do
    local value = self.body[name]
    if is_int(value) and value > 0 and (most == nil or value > most) then
      most = value
    end
  end
  return most
end

-- openai._prompts: a completions batch (a list of texts or token lists) is answered prompt by
-- prompt; a list of token ids is one prompt. cjson cannot tell a list from an object: any
-- item that is a string or a table counts (Python counts objects too).
local function prompts(kind, body)
  local prompt = kind == 'completion' and body.prompt or nil
  if type(prompt) ~= 'table' then
    return 1
  end
  local count = 0
  for _, item in ipairs(prompt) do
    if type(item) == 'string' or type(item) == 'table' then
      count = count + 1
    end
  end
  return math.max(1, count)
end

-- Answers generated, each up to max_tokens: n (or best_of, the larger) per prompt.
function Request:choices()
  local most = 1
  for _, name in ipairs({'n', 'best_of'}) do
    local value = self.body[name]
    if is_int(value) and value > most then
      most = value
    end
  end
  return most * prompts(self.kind, self.body)
end

-- What this request can cost at most: the reservation.
function Request:worst_case_tokens()
  return math.min(self.prompt_tokens + (self:max_tokens() or 0) * self:choices(), MAX_EXACT_COUNT)
end

-- The smallest reservation a default max_tokens may be lowered to; nil for the client's own.
function Request:least_tokens()
  return self.defaulted and self.prompt_tokens + self:choices() or nil
end

-- Lower a default max_tokens to what `reserved` holds; true when it changed.
function Request:fit(reserved)
  if not self.defaulted or reserved >= self:worst_case_tokens() then
    return false
  end
  self:set_max_tokens(math.max(1, math.floor((reserved - self.prompt_tokens) / self:choices())))
  return true
end

function Request:set(name, value)
  self.body[name] = value
  self.raw = jsontext.set(self.raw, name, cjson.encode(value))
  self.changed = true
end

-- Cap the output: every name the route reads that the client sent (null included), else
-- max_tokens (one left as it was could be the one the model server honours).
function Request:set_max_tokens(value)
  local set = false
  for _, name in ipairs(MAX_TOKENS_NAMES[self.kind]) do
    if self.body[name] ~= nil then
      self:set(name, value)
      set = true
    end
  end
  if not set then  -- the route's own name (max_tokens; max_output_tokens for responses)
    local names = MAX_TOKENS_NAMES[self.kind]
    self:set(names[#names] or 'max_tokens', value)
  end
end

function Request:set_model(model)
  self:set('model', model)
end

-- Streamed answers carry usage only when asked: ask, so settling is exact. True when the
-- client had not asked: its usage chunk is then the gateway's to strip.
function Request:ask_for_stream_usage()
  if self.kind == 'response' then  -- its stream ends with response.completed, usage and all
    return false
  end
  local options = self.body.stream_options
  if type(options) == 'table' and options.include_usage == true then
    return false
  end
  local text = '{"include_usage":true}'
  if type(options) == 'table' and jsontext.member(self.raw, 'stream_options'):match('^{') then
    text = jsontext.set(jsontext.member(self.raw, 'stream_options'), 'include_usage', 'true')
    options.include_usage = true
  else
    options = {include_usage = true}
  end
  self.body.stream_options = options
  self.raw = jsontext.set(self.raw, 'stream_options', text)
  self.changed = true
  return true
end

-- openai._usage_only: an event whose data is {"choices": [], "usage": {...}}.
local function usage_only(event)
  if not event:find('"usage"', 1, true) then
    return false  -- most events: not parsed a second time (the meter did)
  end
  local parts = {}
  for line in event:gmatch('[^\r\n]+') do
    if line:sub(1, 5) == 'data:' then
      parts[#parts + 1] = line:sub(6):match('^%s*(.-)%s*$')
    end
  end
  local data = table.concat(parts)
  if data:sub(1, 1) ~= '{' then
    return false
  end
  local document = cjson.decode(data)
  return type(document) == 'table' and type(document.choices) == 'table'
    and next(document.choices) == nil and type(document.usage) == 'table'
end

local Strip = {}
Strip.__index = Strip

-- openai.UsageChunkFilter: takes the usage-only event out of a stream whose client did not
-- ask for it; every other event passes as soon as it is complete, byte for byte.
function _M.usage_filter()
  return setmetatable({pending = ''}, Strip)
end

-- The end of the event that starts at `start`: a blank line in any line ending.
local function event_end(text, start)
  local best
  for _, blank in ipairs({'\r\n\r\n', '\n\n', '\r\r'}) do
    local _, stop = text:find(blank, start, true)
    if stop and (best == nil or stop < best) then
      best = stop
    end
  end
  return best
end

function Strip:feed(chunk, last)
  local text = self.pending .. (chunk or '')
  local passed, start = {}, 1
  while true do
    local stop = event_end(text, start)
    if not stop then
      break
    end
    local event = text:sub(start, stop)
    if not usage_only(event) then
      passed[#passed + 1] = event
    end
    start = stop + 1
  end
  self.pending = text:sub(start)
  if last then
    if not usage_only(self.pending) then
      passed[#passed + 1] = self.pending
    end
    self.pending = ''
  end
  return table.concat(passed)
end

-- openai.whole_count: a token count a model server reports, a whole number from 0 up to
-- 2^53 (past it a double holds no exact count); `true`, -5, 1.5, "10", 1e30 are none.
local function whole_count(value)
  return is_int(value) and value >= 0 and value < MAX_EXACT_COUNT
end

-- openai._usage: prompt and completion (completion made up to a larger total); nil when there
-- is no usage object, false when there is one without a count the gateway can read (its
-- answer is then charged as one it cannot read: its reservation).
local function usage_of(value)
  if type(value) ~= 'table' then
    return nil
  end
  local prompt, completion, total = value.prompt_tokens, value.completion_tokens, value.total_tokens
  if prompt == nil then  -- the Responses API's names
    prompt = value.input_tokens
  end
  if completion == nil then
    completion = value.output_tokens
  end
  if completion == nil then
    completion = 0
  end
  if not whole_count(prompt) or not whole_count(completion) then
    return whole_count(total) and {prompt = 0, completion = total, estimated = false} or false
  end
  if whole_count(total) and total > prompt + completion then
    completion = total - prompt  -- e.g. reasoning tokens counted only in the total
  end
  return {prompt = prompt, completion = completion, estimated = false}
end

local function choice_chars(choice)
  local total = 0
  for _, holder in ipairs({choice.delta or false, choice.message or false, choice}) do
    if type(holder) == 'table' then
      for _, name in ipairs({'content', 'text'}) do
        if type(holder[name]) == 'string' then
          total = total + jsontext.length(holder[name])
        end
      end
    end
  end
  return total
end

-- openai._output_chars: a whole response's `output` text, or one output_text delta event.
local function output_chars(document)
  if document.type == 'response.output_text.delta' then
    return type(document.delta) == 'string' and jsontext.length(document.delta) or 0
  end
  if document.object ~= 'response' or type(document.output) ~= 'table' then
    return 0
  end
  local total = 0
  for _, item in ipairs(document.output) do
    for _, part in ipairs(type(item) == 'table' and type(item.content) == 'table'
        and item.content or {}) do
      if type(part) == 'table' then
        total = total + choice_chars(part)  -- a part's `text`, as a choice's
      end
    end
  end
  return total
end

-- openai.output_tokens: a response object's output text in tokens, estimated as the meter
-- estimates an answer without usage (⌈characters ÷ CHARS_PER_TOKEN⌉).
function _M.output_tokens(response)
  return math.ceil(output_chars(response) / CHARS_PER_TOKEN)
end

-- openai.FINAL_STATUSES: a response in one of these has generated all it will.
local FINAL_STATUSES = {completed = true, incomplete = true, failed = true, cancelled = true}
_M.FINAL_STATUSES = FINAL_STATUSES

local Meter = {}
Meter.__index = Meter

-- Watches answer bytes as they pass and finds the usage: the JSON body's, or for SSE the
-- event that carries it (the last one). `ceiling`: what an answer too big to read is charged
-- (the reservation; openai.UsageMeter's), as is one without usage when `background` (a
-- background Responses request: generated after its answer ends).
function _M.meter(streaming, prompt_estimate, ceiling, background)
  return setmetatable({streaming = streaming, prompt_estimate = prompt_estimate,
    ceiling = ceiling, background = background or false, buffer = {},
    size = 0, usage = nil, completion_chars = 0, overflow = false, pending = '',
    unreadable = false, unreadable_usage = false, events = false}, Meter)
end

-- Read one JSON document's usage and text; false when it is no JSON object.
function Meter:read_document(data)
  local document = cjson.decode(data)
  if type(document) ~= 'table' or data:match('^%s*(.)') ~= '{' then
    return false
  end
  local usage = usage_of(document.usage)
  if usage == nil and type(document.response) == 'table' then  -- response.completed holds it
    usage = usage_of(document.response.usage)
  end
  if usage == false then
    self.unreadable_usage = true
  elseif usage then
    self.usage = usage
  end
  -- openai._response_id: a response object's id, whole or held by an event.
  local held = type(document.response) == 'table' and document.response or document
  if held.object == 'response' and type(held.id) == 'string' then
    self.response_id = held.id
    self.status = type(held.status) == 'string' and held.status or nil
    -- openai._conversation_id: the conversation it belongs to.
    local conversation = type(held.conversation) == 'table' and held.conversation.id
    if type(conversation) == 'string' then
      self.conversation_id = conversation
    end
  end
  self.completion_chars = self.completion_chars + output_chars(document)
  if type(document.choices) == 'table' then
    for _, choice in ipairs(document.choices) do
      if type(choice) == 'table' then
        self.completion_chars = self.completion_chars + choice_chars(choice)
      end
    end
  end
  return true
end

function Meter:read_events()
  local text = self.pending
  local start = 1
  while true do
    local stop = text:find('\n', start, true)
    if not stop then
      break
    end
    local line = text:sub(start, stop - 1):match('^%s*(.-)%s*$')
    start = stop + 1
    if line:sub(1, 5) == 'data:' then
      self.events = true
      local data = line:sub(6):match('^%s*(.-)%s*$')
      if data ~= '' and data ~= '[DONE]' then
        self:read_document(data)
      end
    end
  end
  self.pending = text:sub(start)
end

function Meter:feed(chunk)
  if self.overflow or chunk == nil or chunk == '' then
    return
  end
  if self.streaming then
    local text = self.pending .. chunk
    if self.events or not text:match('^%s*{') then
      self.pending = text
      self:read_events()
      return
    end
    -- A stream asked for and one JSON document answered (openai.UsageMeter.feed): read as
    -- the document it is.
    self.streaming, chunk, self.pending = false, text, ''
  end
  self.size = self.size + #chunk
  if self.size > MAX_BUFFERED_RESPONSE then
    self.overflow, self.buffer = true, {}  -- too big to parse: estimate instead
    return
  end
  self.buffer[#self.buffer + 1] = chunk
end

-- openai.UsageMeter.ended: whether the answer holds a response object whose `status` says it
-- has generated all it will (read once finish has read the answer).
function Meter:ended()
  return FINAL_STATUSES[self.status or ''] == true
end

-- The usage the upstream reported, else an estimate (marked so).
function Meter:finish()
  if self.streaming then
    self.pending = self.pending .. '\n'
    self:read_events()
  elseif not self.overflow then
    self.unreadable = not self:read_document(table.concat(self.buffer))
  end
  self.buffer, self.pending = {}, ''
  -- A background answer's usage counts only once the response is finished (openai.UsageMeter):
  -- one still queued or running has more to generate, whatever usage it shows.
  local unfinished = self.background and not self:ended()
  if self.usage and not unfinished then
    return self.usage
  end
  local completion = math.ceil(self.completion_chars / CHARS_PER_TOKEN)
  -- An answer that could not be read whole (too big, cut off, garbled), or one generated after
  -- it ends (background): its reservation.
  local hidden = self.overflow or self.unreadable or self.unreadable_usage or self.background
  if hidden and self.ceiling ~= nil then
    completion = math.max(completion, self.ceiling - self.prompt_estimate)
  end
  return {prompt = self.prompt_estimate, completion = completion, estimated = true}
end

return _M
