"""HTTPS on the gateway's own listener (`[gateway] tls_cert` / `tls_key`), with a self-signed
certificate made by `openssl` in the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from launcher.facts.strictconf import ConfigError
from tests.support.fakes import MakeFake, fast_settings

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}


def make_cert(directory: Path, name: str = "gw") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (PEM)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_the_gateway_serves_https_with_the_configured_certificate(
    fakes: MakeFake, tmp_path: Path
) -> None:
    a = await fakes(name="a")
    cert, key = make_cert(tmp_path)
    settings = fast_settings(a.backend(), tls_cert=str(cert), tls_key=str(key))
    keys = ApiKeys(api=("user-key",))
    async with GatewayServer(settings, MemoryStore(), keys=keys) as gw:
        assert gw.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        headers = {"Authorization": "Bearer user-key"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as http:
            async with http.post(gw.url + "/api/generate", json=GENERATE, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["done"] is True
            async with http.get(gw.url + "/api/corral/ready") as resp:
                assert resp.status == 200
        # A client that does not trust the certificate refuses the connection...
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(gw.url + "/"):
                    pass
            # ...and plain HTTP to the TLS port gets no HTTP answer.
            with pytest.raises(aiohttp.ClientError):
                async with http.get(gw.url.replace("https://", "http://") + "/") as resp:
                    await resp.read()
    assert len(a.calls("/api/generate")) == 1


async def test_a_certificate_that_does_not_load_stops_the_gateway_before_it_listens(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    mismatched = fast_settings(tls_cert=str(cert), tls_key=str(other_key))
    with pytest.raises(ConfigError, match=r"gateway\.tls_cert"):
        await GatewayServer(mismatched, MemoryStore(), keys=ApiKeys()).start()
    missing = fast_settings(tls_cert=str(tmp_path / "nope.crt"), tls_key=str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError, match="no such file"):
        await GatewayServer(missing, MemoryStore(), keys=ApiKeys()).start()


def test_corral_gateway_refuses_a_cert_without_a_key_in_one_line(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'[gateway]\nlisten = "127.0.0.1:0"\ntls_cert = "{cert}"\n')
    corral = Path(sys.executable).with_name("corral")
    result = subprocess.run(
        [str(corral), "gateway", "--config", str(config), "--backend", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gateway.tls_key" in lines[0] and "together" in lines[0], result.stderr
