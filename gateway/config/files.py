"""Files a config names that must exist before the gateway can start. ``portcullis check`` reports
them as errors at their line, so that a config it passes does not then fail at ``run``."""

from __future__ import annotations

from pathlib import Path

from gateway.config import GATEWAY_FILE, Config
from gateway.config.loader import locate
from gateway.errors import ConfigProblem


def missing_certificates(config: Config, config_dir: Path) -> list[ConfigProblem]:
    """Each ``gateway.certificates[].file``, each ``deviceCertificates.caFiles`` entry and each
    ``forwardAuth.tls`` file that is not a file, with the command that makes it."""
    name, data = config.source(GATEWAY_FILE)
    return [locate(data, ("gateway", "certificates", index, "file"), name,
                   f"{config.path(certificate.file)} does not exist, and the gateway cannot start without it: "
                   f"create it (and the CA kiosks and test clients trust) with `portcullis certs --config "
                   f"{config_dir} init`, or put your own PEM there (certificate chain and private key)")
            for index, certificate in enumerate(config.gateway_file.gateway.certificates)
            if not config.path(certificate.file).is_file()] + missing_device_cas(config, config_dir) + \
        missing_forward_auth_files(config, config_dir)


def missing_device_cas(config: Config, config_dir: Path) -> list[ConfigProblem]:
    """Each ``deviceCertificates.caFiles`` entry that is not a file (without it every device
    certificate would be refused: ``run`` stops instead)."""
    name, data = config.source(GATEWAY_FILE)
    problems = []
    for host, protected in config.gateway_file.protected_hosts.items():
        settings = protected.device_certificates
        for index, file in enumerate(settings.ca_files if settings is not None else ()):
            if not config.path(file).is_file():
                problems.append(locate(
                    data, ("protectedHosts", host, "deviceCertificates", "caFiles", index), name,
                    f"{config.path(file)} does not exist, and no device certificate could be verified without it: "
                    f"put your MDM's issuing CA there (PEM), or for the demo device CA run `portcullis certs "
                    f"--config {config_dir} init`"))
    return problems


def missing_forward_auth_files(config: Config, config_dir: Path) -> list[ConfigProblem]:
    """Each ``forwardAuth.tls`` file that is not a file: without it the listener cannot start."""
    forward_auth = config.gateway_file.forward_auth
    tls = forward_auth.tls if forward_auth is not None else None
    if tls is None:
        return []
    name, data = config.source(GATEWAY_FILE)
    files: list[tuple[tuple[str | int, ...], Path, str]] = [(
        ("certificateFile",), tls.certificate_file,
        f"create it with `portcullis certs --config {config_dir} init` (a certificate for forwardAuth.listen.host "
        "signed by the gateway's CA, which the edge then trusts), or put your own PEM there (certificate chain "
        "and private key)")]
    if tls.key_file is not None:
        files.append((("keyFile",), tls.key_file, "put the certificate's private key there (PEM)"))
    files += [(("proxyCaFiles", index), file, "put the CA that issues the edges' client certificates there (PEM)")
              for index, file in enumerate(tls.proxy_ca_files)]
    return [locate(data, ("forwardAuth", "tls", *loc), name,
                   f"{config.path(file)} does not exist, and the forward-auth listener cannot start without it: {fix}")
            for loc, file, fix in files if not config.path(file).is_file()]
