"""A Prometheus behind TLS and basic auth (its own --web.config.file, a certificate from a
test CA): the source reads it with GOVERNOR_PROMETHEUS__CA_FILE and the login, and every way
of getting the connection wrong is an error naming what to fix — never a silent zero."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.errors import SignalError
from controller.model import ScalarSample, SignalKey, Validity
from controller.signals import PrometheusSource
from tests.support.prometheus import PrometheusServer
from tests.support.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.integration

LOGIN = ("governor", "correct horse battery staple")
QUERY = SignalKey("vector(42)")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("secured"), tls=tls, basic_auth=LOGIN)
    server.start()
    yield server
    server.stop()


def read(server: PrometheusServer, **settings: Any) -> ScalarSample:
    with PrometheusSource.from_url(server.url, sample_age_refresh_seconds=0.0, **settings) as src:
        sample = src.fetch([QUERY], time.time()).samples[QUERY]
    assert isinstance(sample, ScalarSample)
    return sample


@pytest.fixture
def image_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """What many images set, and requests would let override the source's own choice."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")


@pytest.mark.usefixtures("image_ca_bundle")
def test_tls_with_the_ca_file_and_the_login_reads_the_value(
    secured: PrometheusServer, tls: TlsFiles
) -> None:
    assert secured.url.startswith("https://")
    sample = read(secured, ca_file=tls.ca_file, username=LOGIN[0], password=LOGIN[1])
    assert (sample.validity, sample.value) == (Validity.OK, 42.0)


def test_a_wrong_password_is_an_error_that_says_401(
    secured: PrometheusServer, tls: TlsFiles
) -> None:
    sample = read(secured, ca_file=tls.ca_file, username=LOGIN[0], password="guess")
    assert sample.validity is Validity.ERROR
    assert "HTTP 401" in sample.detail
    assert "guess" not in sample.detail


def test_an_untrusted_certificate_is_an_error_that_names_the_ca_setting(
    secured: PrometheusServer,
) -> None:
    sample = read(secured, username=LOGIN[0], password=LOGIN[1])  # system CAs only
    assert sample.validity is Validity.ERROR
    assert "certificate verify failed" in sample.detail
    assert "GOVERNOR_PROMETHEUS__CA_FILE" in sample.detail


@pytest.mark.usefixtures("image_ca_bundle")
def test_verification_can_be_turned_off_on_purpose(secured: PrometheusServer) -> None:
    sample = read(secured, verify_tls=False, username=LOGIN[0], password=LOGIN[1])
    assert (sample.validity, sample.value) == (Validity.OK, 42.0)


def test_the_start_up_check_refuses_a_server_it_cannot_trust(secured: PrometheusServer) -> None:
    with (
        PrometheusSource.from_url(secured.url, username=LOGIN[0], password=LOGIN[1]) as src,
        pytest.raises(SignalError, match=r"certificate verify failed.*CA_FILE"),
    ):
        src.check()


SECURED_POLICY = """\
apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: answer}
spec:
  signals:
    answer: {query: 'vector(42)'}
  when: answer > 1
  actions: [{target: global/requests_per_second, set: 100}]
"""


def test_backtest_reads_with_the_live_tls_and_auth_settings(
    secured: PrometheusServer, tls: TlsFiles, tmp_path: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "answer.yaml").write_text(SECURED_POLICY)
    now = int(time.time())
    args = ["backtest", "--from", str(now - 300), "--to", str(now), "--policies",
            str(tmp_path / "policies"), "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    env = {
        "GOVERNOR_PROMETHEUS__URL": secured.url,
        "GOVERNOR_PROMETHEUS__CA_FILE": str(tls.ca_file),
        "GOVERNOR_PROMETHEUS__USERNAME": LOGIN[0],
        "GOVERNOR_PROMETHEUS__PASSWORD": LOGIN[1],
        "GOVERNOR_REDIS__URL": None,
    }
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["errors"] == []
    assert [f["event"] for f in payload["firings"]] == ["engaged"]
    wrong = CliRunner().invoke(app, args, env={**env, "GOVERNOR_PROMETHEUS__PASSWORD": "nope"})
    assert wrong.exit_code == 1
    (line,) = wrong.stderr.splitlines()
    assert "HTTP 401" in line
    assert LOGIN[1] not in wrong.output
