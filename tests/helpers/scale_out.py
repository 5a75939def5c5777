"""Two gateway processes sharing Redis, as the scale-out tests run them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from cryptography.fernet import Fernet
from ruamel.yaml import YAML

from gateway.app.demo import ALEX_IPHONE, activesync
from gateway.signals.mtd import sign
from tests.conftest import MTD_SECRET, Gateway, Ports
from tests.gateway_process import GatewayProcess, sibling_config
from tests.helpers.hosts import SERVICE
from tests.redis_server import RedisServer

STALENESS = 3  # deviceSignals.cache.maxStalenessSeconds of these gateways
SESSION_KEY = Fernet.generate_key().decode()


class Instance:
    """One gateway process of the pair, and how to talk to it."""

    def __init__(self, gateway: Gateway, config_dir: Path) -> None:
        self.gateway, self.config_dir = gateway, config_dir
        data = YAML().load(config_dir / "portcullis.yaml")
        self.port = int(data["gateway"]["listen"]["port"])
        self.admin_port = int(data["admin"]["listen"]["port"])
        self.process = GatewayProcess(config_dir, env={"PORTCULLIS_TEST_SESSION_KEY": SESSION_KEY})

    def ready(self) -> Instance:
        """Listening, and subscribed to the change feed (``/readyz`` passes only then)."""
        self.process.wait_for(r"Portcullis is listening")
        self.process.wait_until(lambda: self.readiness() == 200, timeout=20)
        return self

    def readiness(self) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def sync(self, token: str) -> int:
        return self.gateway.request("mail.contoso.test", activesync(ALEX_IPHONE), method="POST", token=token,
                                    port=self.port).status_code

    def push(self, body: str) -> httpx.Response:
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": timestamp,
                   "X-Portcullis-Signature": sign(MTD_SECRET.encode(), timestamp, body.encode())}
        return self.gateway.request(SERVICE, "/mtd/demo-mtd/events", method="POST", content=body, headers=headers,
                                    port=self.port)


def shared_config(directory: Path, gateway: Gateway, demo_ports: Ports, redis: RedisServer, prefix: str) -> Path:
    config_dir = sibling_config(directory, gateway, demo_ports, state={"redis": redis.url, "keyPrefix": prefix})
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    del data["deviceSignals"]["database"]  # with state, devices live in Redis
    data["deviceSignals"]["cache"]["maxStalenessSeconds"] = STALENESS
    data["browserSignIn"]["sessionKeyEnv"] = "PORTCULLIS_TEST_SESSION_KEY"  # one cookie key for every host
    yaml.dump(data, path)
    return config_dir
