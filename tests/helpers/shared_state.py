"""Device records and key prefixes for tests against the shared (Redis) state."""

from __future__ import annotations

import json
from uuid import uuid4

from gateway.signals.devices import DeviceRecord


def prefix() -> str:
    return f"t{uuid4().hex[:8]}:"


def record(device_id: str, **fields: object) -> DeviceRecord:
    return DeviceRecord.model_validate_json(json.dumps({"azureADDeviceId": device_id, "complianceState": "compliant",
                                                        "deviceName": f"Phone {device_id[-1]}", **fields}))
