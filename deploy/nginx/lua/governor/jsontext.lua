-- JSON as text: change one member of a request body in place (the client's other bytes pass
-- unchanged: lua-cjson would turn [] into {} and round large numbers), and the lengths Python
-- measures (code points; json.dumps) so token estimates match the Python gateway's.

local cjson = require 'cjson.safe'

local _M = {}

local byte, find, sub = string.byte, string.find, string.sub
local QUOTE, BACKSLASH, OPEN, CLOSE, OPEN_LIST, CLOSE_LIST = 34, 92, 123, 125, 91, 93

local function skip_space(text, i)
  return find(text, '[^ \t\r\n]', i)
end

-- The index of the quote that closes the string opened at i.
local function string_end(text, i)
  local j = i + 1
  while true do
    local k = find(text, '["\\]', j)
    if not k then
      return nil
    end
    if byte(text, k) == QUOTE then
      return k
    end
    j = k + 2  -- an escape: skip the escaped character
  end
end

-- The index of the last character of the value that starts at i.
local function value_end(text, i)
  local c = byte(text, i)
  if c == QUOTE then
    return string_end(text, i)
  end
  if c == OPEN or c == OPEN_LIST then
    local depth, j = 0, i
    while true do
      local k = find(text, '[{}%[%]"]', j)
      if not k then
        return nil
      end
      local b = byte(text, k)
      if b == QUOTE then
        k = string_end(text, k)
        if not k then
          return nil
        end
      elseif b == OPEN or b == OPEN_LIST then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then
          return k
        end
      end
      j = k + 1
    end
  end
  local k = find(text, '[,}%] \t\r\n]', i)
  return (k or #text + 1) - 1
end

-- The members of the object `text` (valid JSON, checked before): {name, first, last} spans
-- of each value, and the index of the closing brace.
local function members(text)
  local found = {}
  local i = skip_space(text, 1)
  if not i or byte(text, i) ~= OPEN then
    return nil
  end
  i = skip_space(text, i + 1)
  while i and byte(text, i) ~= CLOSE do
    local name_end = string_end(text, i)
    if not name_end then
      return nil
    end
    local name = cjson.decode(sub(text, i, name_end))
    local colon = skip_space(text, name_end + 1)
    local first = skip_space(text, colon + 1)
    local last = first and value_end(text, first)
    if not last then
      return nil
    end
    found[#found + 1] = {name = name, first = first, last = last}
    i = skip_space(text, last + 1)
    if i and byte(text, i) == 44 then  -- ','
      i = skip_space(text, i + 1)
    end
  end
  if not i then
    return nil
  end
  return found, i
end

-- The raw text of member `name` of the object `text`, or nil (the last one wins, as in
-- Python's json).
function _M.member(text, name)
  local found = members(text)
  local value
  for _, member in ipairs(found or {}) do
    if member.name == name then
      value = sub(text, member.first, member.last)
    end
  end
  return value
end

-- The first member name of the object `text` (valid JSON) met a second time, or nil (the
-- Python gateway's openai._Members).
function _M.twice(text)
  local seen = {}
  for _, member in ipairs(members(text) or {}) do
    if seen[member.name] then
      return member.name
    end
    seen[member.name] = true
  end
  return nil
end

-- `text` with member `name` set to the JSON `value` (replaced where it is, else appended).
function _M.set(text, name, value)
  local found, close = members(text)
  if not found then
    return nil
  end
  local replaced = false
  for i = #found, 1, -1 do  -- from the end, so earlier spans stay where they are
    local member = found[i]
    if member.name == name then
      text = sub(text, 1, member.first - 1) .. value .. sub(text, member.last + 1)
      replaced = true
    end
  end
  if replaced then
    return text
  end
  local entry = cjson.encode(name) .. ':' .. value
  return sub(text, 1, close - 1) .. (#found > 0 and ',' or '') .. entry .. sub(text, close)
end

-- Python's len(str): code points, i.e. the bytes that do not continue a UTF-8 sequence.
function _M.length(text)
  local _, count = text:gsub('[^\128-\191]', '')
  return count
end

-- The code points of a UTF-8 string (invalid bytes count as themselves).
local function utf8_codes(text)
  local i, n = 1, #text
  return function()
    if i > n then
      return nil
    end
    local c = byte(text, i)
    local size, code = 1, c
    if c >= 0xf0 then
      size, code = 4, c % 0x08
    elseif c >= 0xe0 then
      size, code = 3, c % 0x10
    elseif c >= 0xc0 then
      size, code = 2, c % 0x20
    end
    for k = 1, size - 1 do
      code = code * 64 + (byte(text, i + k) or 0x80) % 0x40
    end
    local at = i
    i = i + size
    return at, code
  end
end

-- len(json.dumps(value)) in Python (ensure_ascii, ', ' and ': ' separators), from the value
-- lua-cjson decoded. Lua cannot tell 1.0 from 1: integral numbers count as ints.
local function dumps_length(value)
  local kind = type(value)
  if kind == 'string' then
    local total = 2
    for _, code in utf8_codes(value) do
      if code == QUOTE or code == BACKSLASH or code == 8 or code == 9 or code == 10
          or code == 12 or code == 13 then
        total = total + 2
      elseif code >= 0x20 and code <= 0x7e then
        total = total + 1
      elseif code > 0xffff then
        total = total + 12  -- a surrogate pair of \uXXXX escapes
      else
        total = total + 6
      end
    end
    return total
  elseif kind == 'number' then
    if value == math.floor(value) and math.abs(value) < 1e16 then
      return #string.format('%d', value)
    end
    for precision = 15, 17 do  -- Python's repr: the shortest text that reads back the same
      local written = string.format('%.' .. precision .. 'g', value)
      if tonumber(written) == value then
        return #written
      end
    end
    return #string.format('%.17g', value)
  elseif kind == 'boolean' then
    return value and 4 or 5
  elseif kind == 'table' then
    local total, count, array = 2, 0, true
    for key in pairs(value) do
      count = count + 1
      array = array and type(key) == 'number'
    end
    for key, item in pairs(value) do
      total = total + dumps_length(item)
      if not array then
        total = total + dumps_length(key) + 2
      end
    end
    return total + math.max(count - 1, 0) * 2
  end
  return 4  -- null
end
_M.dumps_length = dumps_length

return _M
