"""The Kong sink over HTTPS: the Admin API's certificate from a private CA is trusted through
GOVERNOR_KONG__CA_FILE, and without it the sink refuses to talk, saying which setting fixes it
(contract test: the loopback Admin API serving TLS with a test CA's certificate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.errors import SinkError
from tests.kong.conftest import A, SinkFactory, plugins_by_owner
from tests.kong.kong_admin import KongAdmin
from tests.support.sink_ticks import converge
from tests.support.tls import TlsFiles, make_tls_files


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def kong_tls(tls: TlsFiles) -> Iterator[KongAdmin]:
    server = KongAdmin(tls=tls).start()
    yield server
    server.stop()


def test_a_private_ca_is_trusted_through_the_ca_file(
    kong_tls: KongAdmin, tls: TlsFiles, make_sink: SinkFactory
) -> None:
    assert kong_tls.url.startswith("https://")
    sink = make_sink(kong_tls, ca_file=tls.ca_file)
    converge(sink, {A("global/requests_per_minute"): 6000.0})
    assert plugins_by_owner(kong_tls)["global"]["config"]["minute"] == 6000


def test_an_untrusted_certificate_is_refused_naming_the_ca_setting(
    kong_tls: KongAdmin, make_sink: SinkFactory
) -> None:
    sink = make_sink(kong_tls)  # system CAs only
    with pytest.raises(SinkError, match="GOVERNOR_KONG__CA_FILE") as refused:
        converge(sink, {A("global/requests_per_minute"): 6000.0})
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert kong_tls.writes() == 0
