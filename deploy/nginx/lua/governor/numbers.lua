-- Numbers written as Python's format() writes them: C's printf rounds exactly (ties to even),
-- as Python does; LuaJIT's own string.format rounds 60.5 to 61 where Python writes 60.

local ffi = require 'ffi'

local _M = {}

pcall(ffi.cdef, 'int snprintf(char *str, size_t size, const char *format, ...);')

local buffer = ffi.new('char[64]')

-- `format` is one C conversion of a double, e.g. '%.0f', '%.4f', '%g'.
function _M.format(format, value)
  local written = ffi.C.snprintf(buffer, 64, format, ffi.cast('double', value))
  return ffi.string(buffer, math.min(written, 63))
end

return _M
