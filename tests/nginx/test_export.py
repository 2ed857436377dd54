"""`governor gateway export-lua`: the scripts nginx and Kong run are, byte for byte, the ones
Python loads (same SHA1), deploy/nginx/scripts/ is a fresh export, and every Lua file of the
nginx module and the Kong plugin compiles."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.clients.scripts import ADMIT, CHARGE, SETTLE
from controller.gateway.export import EXPORTED, SETTINGS_FILE, export_lua, gateway_document
from controller.settings import GatewaySettings, PricesSettings
from tests.nginx.nginx_server import REPO, NginxServer
from tests.support.redis import free_port

CHECKED_IN = REPO / "deploy" / "nginx" / "scripts"
KONG = REPO / "deploy" / "kong" / "governor-admission"
LUA_FILES = sorted((REPO / "deploy" / "nginx" / "lua").rglob("*.lua")) + sorted(KONG.glob("*.lua"))


def test_the_checked_in_scripts_are_the_ones_python_loads() -> None:
    assert [script.name for script in EXPORTED] == ["admit", "settle", "charge"]
    for script in (ADMIT, SETTLE, CHARGE):
        data = (CHECKED_IN / f"{script.name}.lua").read_bytes()
        assert hashlib.sha1(data).hexdigest() == script.sha, (
            f"deploy/nginx/scripts/{script.name}.lua is stale: run "
            "`governor gateway export-lua deploy/nginx/scripts`"
        )
        assert data == script.source.encode()


def test_the_checked_in_settings_are_a_default_export(tmp_path: Path) -> None:
    export_lua(tmp_path, GatewaySettings(), PricesSettings(), "governor")

    for name in ("admit.lua", "settle.lua", "charge.lua", SETTINGS_FILE):
        assert (tmp_path / name).read_bytes() == (CHECKED_IN / name).read_bytes(), name
    document = json.loads((CHECKED_IN / SETTINGS_FILE).read_text())
    assert document["scripts"] == {"admit": ADMIT.sha, "settle": SETTLE.sha, "charge": CHARGE.sha}
    assert document["lease_seconds"] == 600.0  # Admission's default, read from it
    assert "api_key_secret" not in document  # secrets stay in the environment


def test_the_export_command_writes_what_the_settings_say(tmp_path: Path) -> None:
    env = {"GOVERNOR_GATEWAY__RETRY_AFTER_JITTER": "0.5", "GOVERNOR_REDIS__KEY_PREFIX": "gw2",
           "GOVERNOR_GATEWAY__API_KEY_SECRET": "never-written"}  # fmt: skip

    result = CliRunner().invoke(app, ["gateway", "export-lua", str(tmp_path), "--json"], env=env)

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {Path(row["path"]).name: row["sha1"] for row in rows} == {
        "admit.lua": ADMIT.sha, "settle.lua": SETTLE.sha, "charge.lua": CHARGE.sha,
        SETTINGS_FILE: None,
    }  # fmt: skip
    document = gateway_document(GatewaySettings(retry_after_jitter=0.5), PricesSettings(), "gw2")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == document
    assert "never-written" not in (tmp_path / SETTINGS_FILE).read_text()


def test_an_unwritable_export_directory_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    result = CliRunner().invoke(app, ["gateway", "export-lua", str(blocker / "scripts")])

    assert result.exit_code == 2
    assert "cannot write the Lua export" in result.stderr


def test_serving_still_needs_an_upstream() -> None:
    result = CliRunner().invoke(app, ["gateway"])

    assert result.exit_code == 2
    assert "--upstream" in result.output


@pytest.mark.integration
@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_lua_file_compiles(path: Path) -> None:
    checked = subprocess.run(["luac5.1", "-p", str(path)], capture_output=True, text=True)

    assert checked.returncode == 0, checked.stderr


# Loads the Kong plugin's two files in plain Lua 5.1 with only what they import provided (no
# Kong here): the handler's phases and the schema's fields are what Kong looks up by name.
KONG_SHAPE = """
package.preload['governor.config'] = function() return {} end
package.preload['governor.gateway'] = function() return {} end
package.preload['kong.db.schema.typedefs'] = function()
  local function field(extra) return extra or {} end
  return {no_consumer = {}, protocols_http = {}, host = field, port = field}
end
local handler = dofile(arg[1] .. '/handler.lua')
local schema = dofile(arg[1] .. '/schema.lua')
local phases = {}
for _, phase in ipairs({'access', 'response', 'header_filter', 'body_filter', 'log'}) do
  if type(handler[phase]) == 'function' then phases[#phases + 1] = phase end
end
local fields = {}
for _, entry in ipairs(schema.fields) do
  if entry.config then
    for _, item in ipairs(entry.config.fields) do fields[#fields + 1] = next(item) end
  end
end
print(schema.name, type(handler.PRIORITY), handler.VERSION, table.concat(phases, ','),
  table.concat(fields, ','))
"""


@pytest.mark.integration
def test_the_kong_plugin_has_the_phases_and_fields_kong_looks_up() -> None:
    loaded = subprocess.run(
        ["lua5.1", "-"],
        input=KONG_SHAPE.replace("arg[1]", f"'{KONG}'"),
        capture_output=True,
        text=True,
    )

    assert loaded.returncode == 0, loaded.stderr
    name, priority, version, phases, fields = loaded.stdout.split()
    assert (name, priority, version) == ("governor-admission", "number", "0.1.0")
    assert phases.split(",") == ["access", "response", "header_filter", "body_filter", "log"]
    assert set(fields.split(",")) >= {"export_dir", "redis_host", "redis_port", "api_key_secret"}


def test_the_export_table_keeps_whole_paths_and_sha1s_at_80_columns(tmp_path: Path) -> None:
    directory = tmp_path / ("a-directory-name-long-enough-to-fold" * 2)

    result = CliRunner().invoke(
        app, ["gateway", "export-lua", str(directory)], env={"COLUMNS": "80"}
    )

    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "…" not in result.stdout
    files = "".join(row.split("│")[1].strip() for row in rows)  # a folded path, rejoined
    shas = {row.split("│")[2].strip() for row in rows}
    assert files == "".join(
        str(directory / name) for name in ("admit.lua", "settle.lua", "charge.lua", SETTINGS_FILE)
    )
    assert {ADMIT.sha, SETTLE.sha, CHARGE.sha} < shas


def test_the_context_windows_are_exported_as_the_module_meets_models(tmp_path: Path) -> None:
    """nginx looks a model up lower-cased (string.lower): the export lowers the names."""
    settings = GatewaySettings(context_windows={"GPT-4o": 128_000, "meta-llama/Llama-3": 8192},
                               unknown_previous_response_tokens=64_000)  # fmt: skip

    document = gateway_document(settings, PricesSettings(), "governor")

    assert document["context_windows"] == {"gpt-4o": 128_000, "meta-llama/llama-3": 8192}
    assert document["unknown_previous_response_tokens"] == 64_000
    assert document["previous_response_ttl_seconds"] == 30 * 86400


def test_an_export_older_than_the_module_stops_nginx_at_start(tmp_path: Path) -> None:
    """Without the settings of a continued conversation the module would have to guess what
    an unknown `previous_response_id` reserves: it refuses to start, saying to export again."""
    scripts = tmp_path / "scripts"
    export_lua(scripts, GatewaySettings(), PricesSettings(), "governor")
    document = json.loads((scripts / SETTINGS_FILE).read_text())
    del document["unknown_previous_response_tokens"]
    (scripts / SETTINGS_FILE).write_text(json.dumps(document))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GOVERNOR_REDIS__URL": "redis://127.0.0.1:1/0"}
    server = NginxServer(tmp_path / "nginx", scripts, free_port(), env)

    with pytest.raises(RuntimeError, match="nginx did not start") as refused:
        server.start()

    assert "has no previous_response_ttl_seconds, unknown_previous_response_tokens or " in str(
        refused.value
    )
    assert "export again" in str(refused.value)


@pytest.mark.parametrize("scope", [None, "everyone"])
def test_an_export_without_a_known_previous_response_scope_stops_nginx(
    tmp_path: Path, scope: str | None
) -> None:
    """Whose earlier response a request may name is never guessed: an export without the
    setting (or with a value no version writes) stops nginx, saying to export again."""
    scripts = tmp_path / "scripts"
    export_lua(scripts, GatewaySettings(), PricesSettings(), "governor")
    document = json.loads((scripts / SETTINGS_FILE).read_text())
    assert document["previous_response_scope"] == "tenant"  # strict by default
    document.pop("previous_response_scope")
    if scope is not None:
        document["previous_response_scope"] = scope
    (scripts / SETTINGS_FILE).write_text(json.dumps(document))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GOVERNOR_REDIS__URL": "redis://127.0.0.1:1/0"}
    server = NginxServer(tmp_path / "nginx", scripts, free_port(), env)

    with pytest.raises(RuntimeError, match="nginx did not start") as refused:
        server.start()

    assert "has no previous_response_scope" in str(refused.value)
    assert "export again" in str(refused.value)


def test_the_previous_response_scope_is_exported() -> None:
    shared = GatewaySettings(previous_response_scope="shared")

    assert gateway_document(shared, PricesSettings(), "governor")["previous_response_scope"] == (
        "shared"
    )


# The Kong plugin's phases for a Conversations API create, with Kong's PDK and the gateway
# module stubbed (no Kong here): the raw path and query reach the decision, the create is proxied
# buffered, and its whole answer is handed to the gateway before Kong sends it.
KONG_CONVERSATION = """
local decided, answered, buffering = nil, nil, false
package.preload['governor.config'] = function() return {load = function() return {} end} end
package.preload['governor.gateway'] = function()
  return {new = function() return {
    decide = function(_, req)
      decided = req
      return {conversation = {action = 'create', added = 106}}
    end,
    conversation_answered = function(_, call, status, body)
      answered = {call = call, status = status, body = body}
    end,
  } end}
end
ngx = {null = {}, var = {request_id = 'r1'}, worker = {id = function() return 0 end},
  arg = {'', true}, req = {get_headers = function() return {} end}}
local ctx = {plugin = {}}
kong = {
  request = {get_method = function() return 'POST' end,
    get_path = function() return '/v1/conversations' end,
    get_raw_path = function() return '/v1/conversations' end,
    get_raw_query = function() return 'stream=true' end,
    get_headers = function() return {} end, get_header = function() return nil end,
    get_raw_body = function() return '{"items": []}' end},
  client = {get_forwarded_ip = function() return '127.0.0.1' end},
  service = {
    request = {enable_buffering = function() buffering = true end,
      set_raw_body = function() error('the body is the client own') end,
      clear_header = function() end},
    response = {get_status = function() return 200 end,
      get_raw_body = function() return '{"id": "conv_1", "object": "conversation"}' end}},
  response = {exit = function() error('refused') end, set_header = function() end,
    clear_header = function() end},
  ctx = ctx,
}
local handler = dofile(arg[1] .. '/handler.lua')
local conf = {export_dir = 'x', redis_host = 'h', redis_port = 1, redis_database = 0,
  redis_timeout_ms = 1}
for _, phase in ipairs({'access', 'response', 'header_filter', 'body_filter', 'log'}) do
  handler[phase](handler, conf)
end
print(decided.raw_path, decided.query, tostring(buffering), answered.status,
  answered.call.added, answered.body)
"""


@pytest.mark.integration
def test_the_kong_plugin_records_a_conversation_from_the_buffered_answer() -> None:
    loaded = subprocess.run(
        ["lua5.1", "-"],
        input=KONG_CONVERSATION.replace("arg[1]", f"'{KONG}'"),
        capture_output=True,
        text=True,
    )

    assert loaded.returncode == 0, loaded.stderr
    raw_path, query, buffered, status, added, body = loaded.stdout.split(maxsplit=5)
    assert (raw_path, buffered, status, added) == ("/v1/conversations", "true", "200", "106")
    assert query == "stream=true"  # a read streaming a background response passes as it is
    assert body.strip() == '{"id": "conv_1", "object": "conversation"}'


# The Kong plugin's access phase for each outcome that reaches the upstream, with Kong's PDK
# and the gateway module stubbed: the client's Governor key was left on the request Kong
# proxies, so the model server received every tenant's key (nginx.conf and the Python
# gateway drop Authorization and X-Api-Key); and only 100 header lines were read.
KONG_CREDENTIAL = """
package.preload['governor.config'] = function() return {load = function() return {} end} end
package.preload['governor.gateway'] = function()
  return {new = function() return {decide = function() return OUTCOME end} end}
end
local cleared = {}
ngx = {null = {}, var = {request_id = 'r1'}, worker = {id = function() return 0 end},
  req = {get_headers = function(most)
    cleared[#cleared + 1] = 'read-' .. tostring(most)  -- 0: every line
    return {authorization = 'Bearer gov_x'}
  end}}
kong = {
  request = {get_method = function() return 'POST' end,
    get_path = function() return '/v1/chat/completions' end,
    get_raw_path = function() return '/v1/chat/completions' end,
    get_raw_query = function() return nil end,
    get_headers = function() return {authorization = 'Bearer gov_x'} end,
    get_header = function() return nil end, get_raw_body = function() return '{}' end},
  client = {get_forwarded_ip = function() return '127.0.0.1' end},
  service = {request = {enable_buffering = function() end, set_raw_body = function() end,
    clear_header = function(name) cleared[#cleared + 1] = name:lower() end}},
  response = {exit = function() error('refused') end},
  ctx = {plugin = {}},
}
local handler = dofile(arg[1] .. '/handler.lua')
handler.access(handler, {export_dir = 'x', redis_host = 'h', redis_port = 1,
  redis_database = 0, redis_timeout_ms = 1})
table.sort(cleared)
print(table.concat(cleared, ' '))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    "outcome",
    [
        "{call = {streaming = true, changed = false}}",
        "{call = {streaming = false, changed = true, body = '{}'}}",
        "{pass = true}",
        "{conversation = {action = 'create'}}",
    ],
)
def test_the_kong_plugin_reads_every_header_and_never_forwards_the_credential(outcome: str) -> None:
    script = f"OUTCOME = {outcome}\n" + KONG_CREDENTIAL.replace("arg[1]", f"'{KONG}'")
    loaded = subprocess.run(["lua5.1", "-"], input=script, capture_output=True, text=True)

    assert loaded.returncode == 0, loaded.stderr
    # read-0: every header line was read (kong.request.get_headers stopped at 100).
    assert loaded.stdout.split() == ["authorization", "read-0", "x-api-key"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("previous_response_wait_seconds", None), ("previous_response_wait_seconds", 3),
     ("previous_response_waiters", None), ("previous_response_waiters", 1.5)],
)  # fmt: skip
def test_an_export_without_the_record_wait_stops_nginx(
    tmp_path: Path, name: str, value: float | None
) -> None:
    """How long, and how many at once, a lookup without a record waits is read from the
    export, never guessed: an older export (or a value Python refuses) stops nginx."""
    scripts = tmp_path / "scripts"
    export_lua(scripts, GatewaySettings(), PricesSettings(), "governor")
    document = json.loads((scripts / SETTINGS_FILE).read_text())
    assert (document["previous_response_wait_seconds"], document["previous_response_waiters"]) == (
        0.5, 64,
    )  # fmt: skip
    document.pop(name)
    if value is not None:
        document[name] = value
    (scripts / SETTINGS_FILE).write_text(json.dumps(document))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GOVERNOR_REDIS__URL": "redis://127.0.0.1:1/0"}
    server = NginxServer(tmp_path / "nginx", scripts, free_port(), env)

    with pytest.raises(RuntimeError, match="nginx did not start") as refused:
        server.start()

    assert "has no previous_response_wait_seconds (0 to 2) or previous_response_waiters" in str(
        refused.value
    )
    assert "export again" in str(refused.value)


def test_the_record_wait_is_exported() -> None:
    settings = GatewaySettings(previous_response_wait_seconds=0, previous_response_waiters=3)

    document = gateway_document(settings, PricesSettings(), "governor")

    assert document["previous_response_wait_seconds"] == 0
    assert document["previous_response_waiters"] == 3
