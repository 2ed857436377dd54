-- Configuration of the `governor-admission` Kong plugin. Everything that shapes an answer
-- (key prefix, prices, problem type URIs, jitter, lease) comes from the governor.json that
-- `governor gateway export-lua DIR` wrote beside the scripts, so Kong answers as
-- `governor gateway` does; here only where that export is and how to reach Redis.

local typedefs = require 'kong.db.schema.typedefs'

return {
  name = 'governor-admission',
  fields = {
    {consumer = typedefs.no_consumer},  -- Governor's own API keys name the tenant
    {protocols = typedefs.protocols_http},
    {config = {
      type = 'record',
      fields = {
        {export_dir = {type = 'string', required = true,
          default = '/usr/local/share/governor/scripts',
          description = 'directory written by `governor gateway export-lua`'}},
        {redis_host = typedefs.host({required = true, default = '127.0.0.1'})},
        {redis_port = typedefs.port({required = true, default = 6379})},
        {redis_username = {type = 'string', referenceable = true}},
        {redis_password = {type = 'string', encrypted = true, referenceable = true}},
        {redis_database = {type = 'integer', required = true, default = 0,
          between = {0, 1024}}},
        {redis_timeout_ms = {type = 'integer', required = true, default = 2000, gt = 0}},
        {api_key_secret = {type = 'string', encrypted = true, referenceable = true,
          description = 'GOVERNOR_GATEWAY__API_KEY_SECRET of the deployment (HMAC of key '
            .. 'digests); unset: plain SHA-256 digests'}},
      },
    }},
  },
}
