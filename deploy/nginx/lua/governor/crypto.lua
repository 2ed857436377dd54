-- SHA-256, HMAC-SHA256 and hex through the OpenSSL that nginx (or Kong's OpenResty) links:
-- API key digests must be computed exactly as controller/gateway/keys.py computes them.

local bit = require 'bit'
local ffi = require 'ffi'

local _M = {}

-- Each declaration on its own: another module (resty.openssl in Kong) may have made one
-- already, and redeclaring is an error only for that one.
for _, declaration in ipairs({
  'typedef struct evp_md_st EVP_MD;',
  'const EVP_MD *EVP_sha256(void);',
  'unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len, '
    .. 'const unsigned char *d, size_t n, unsigned char *md, unsigned int *md_len);',
  'unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);',
}) do
  pcall(ffi.cdef, declaration)
end

local C = ffi.C
local digest = ffi.new('unsigned char[32]')
local digest_length = ffi.new('unsigned int[1]')

function _M.hex(bytes)
  return (bytes:gsub('.', function(c) return string.format('%02x', c:byte()) end))
end

function _M.sha256(data)
  C.SHA256(data, #data, digest)
  return ffi.string(digest, 32)
end

function _M.hmac_sha256(key, data)
  C.HMAC(C.EVP_sha256(), key, #key, data, #data, digest, digest_length)
  return ffi.string(digest, digest_length[0])
end

-- Equal strings? Time depends on the lengths only, never on where they differ.
function _M.equal(a, b)
  if #a ~= #b then
    return false
  end
  local differ = 0
  for i = 1, #a do
    differ = bit.bor(differ, bit.bxor(a:byte(i), b:byte(i)))
  end
  return differ == 0
end

return _M
