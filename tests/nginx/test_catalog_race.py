"""The nginx module's per-worker plan catalog when requests arrive together while it reads the
catalog again (lua5.1 with cjson, the worker's cosockets stood in for by coroutines)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LUA = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "lua"

# A worker that read the catalog while none was published (it started before the controller's
# first tick) and reads it again once one is: the first request's read yields (a cosocket
# waiting for Redis), and a second request arrives meanwhile.
RACE = """
package.path = arg_lua .. '/?.lua;' .. package.path
local catalog = require 'governor.catalog'
local published = false
local spec = '{"models": [], "fail_mode": "closed"}'
local function client(yields)
  local replies
  return {
    init_pipeline = function() end,
    hgetall = function() replies = {published and {'free', spec} or {}, '7'} end,
    get = function() end,
    commit_pipeline = function()
      local answer = replies
      if yields then coroutine.yield() end
      return answer
    end,
  }
end
local plans = catalog.new('governor:plans', 5, function() return 100 end)
plans:current(client(false), 'free')  -- at start: none published
published = true
local first = coroutine.create(function() return plans:current(client(true), 'free') end)
coroutine.resume(first)  -- its read under way
local second = plans:current(client(false), 'free')
local _, found = coroutine.resume(first)
print(second ~= nil, found ~= nil, plans:missing())
"""


def test_requests_during_a_read_of_a_newly_published_catalog_are_not_refused() -> None:
    """The worker answered the second request 503 #not-configured ("no plan catalog or limits
    are published yet") from the empty catalog of its start while the first request's read
    found the one now published: a burst after the controller's first tick was partly
    refused. While the catalog is empty, every request reads it (as one never read is)."""
    ran = subprocess.run(["lua5.1", "-"], input=RACE.replace("arg_lua", f"'{LUA}'"),
                         capture_output=True, text=True)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["true", "true", "unknown"]
