"""A Prometheus behind TLS and basic auth (its own --web.config.file, a certificate from a
test CA): the source reads it with GOVERNOR_PROMETHEUS__CA_FILE and the login, and every way
of getting the connection wrong is an error naming what to fix — never a silent zero."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

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
