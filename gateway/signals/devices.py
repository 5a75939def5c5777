"""Device inventory and MTD threat level providers.

Providers are Protocols so tests and later connectors (Graph, SQLite, MTD webhooks) plug in
without touching policy code. The embedded default reads a YAML file under ``config/``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Protocol

from pydantic import AwareDatetime, Field, field_validator

from gateway.config.loader import locate, raise_if, read_yaml, validate
from gateway.config.models import Model
from gateway.errors import ConfigProblem
from gateway.policy.model import ComplianceState, DeviceKey, DeviceThreatLevel, ManagedDevice

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A lookup by key names at most this many devices: enough to refuse several and name them in the
# log. White-box PCs share placeholder serials ("To be filled by O.E.M.") by the thousand.
MATCHES_MAX = 10


class DeviceInventory(Protocol):
    """Looks up a device by its Entra device id (the token's ``deviceid`` claim)."""

    name: str

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        """The device, or None if the inventory does not know it. Raises SignalUnavailable."""
        ...

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        """The azureADDeviceIds of every device whose ``key`` is ``value`` (normalised, see
        ``normalised``; at most ``MATCHES_MAX`` of them), sorted: a device certificate may name its
        device by any of them. The caller refuses none as unknown and several as ambiguous, never
        picks one. Raises SignalUnavailable."""
        ...


def normalised(key: DeviceKey, value: str) -> str:
    """A device key as the inventory stores and compares it. Ids are GUIDs: lower case, as Entra
    writes them. Serial numbers are trimmed and upper-cased: vendors print them in capitals but
    treat them case-insensitively, and the same serial arrives from Graph, a hand-made CSV and an
    MDM certificate profile (``{{SerialNumber}}``) with different case or padding; compared as
    written, the device would not be found, or two records of one serial would not be seen as one
    (an ambiguity the lookup must refuse)."""
    if key is DeviceKey.serial_number:
        return value.strip().upper()
    return value.strip().lower()


def key_value(device: ManagedDevice, key: DeviceKey) -> str | None:
    """The device's value of ``key`` (stored normalised)."""
    if key is DeviceKey.intune_device_id:
        return device.intune_device_id
    if key is DeviceKey.serial_number:
        return device.serial_number
    return device.device_id


class OwnerType(StrEnum):
    """Intune ``managedDeviceOwnerType``; device filters see it as ``deviceOwnership`` Company/Personal."""

    company = "company"
    personal = "personal"


class DeviceRecord(Model):
    """One entry of the inventory file, in Intune's field names."""

    azure_ad_device_id: Annotated[str, Field(min_length=1, alias="azureADDeviceId")]
    eas_device_id: str | None = None
    device_name: str | None = None
    user_principal_name: str | None = None
    operating_system: str | None = None
    compliance_state: ComplianceState
    compliance_grace_period_expiration_date_time: AwareDatetime | None = None
    threat_level: DeviceThreatLevel | None = None
    threat_source: str | None = None
    threat_reported_date_time: AwareDatetime | None = None
    management_agent: str | None = None
    jail_broken: bool | None = None
    last_sync_date_time: AwareDatetime | None = None
    managed_device_owner_type: OwnerType | None = None
    manufacturer: str | None = None
    model: str | None = None
    os_version: str | None = None
    trust_type: str | None = None
    extension_attributes: dict[str, str] = {}
    intune_device_id: str | None = None  # Graph managedDevice ``id``
    serial_number: str | None = None

    @field_validator("intune_device_id")
    @classmethod
    def _intune_device_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = normalised(DeviceKey.intune_device_id, value)
        if not GUID.match(value):
            raise ValueError(f"{value!r} is not a GUID (Intune's managed device id)")
        return value

    @field_validator("serial_number")
    @classmethod
    def _serial_number(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = normalised(DeviceKey.serial_number, value)
        if not value:
            raise ValueError("a serial number must not be blank")
        return value

    @field_validator("extension_attributes")
    @classmethod
    def _extension_names(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = [f"extensionAttribute{i}" for i in range(1, 16)]
        for name in value:
            if name not in allowed:
                raise ValueError(f"{name!r} is not one of extensionAttribute1..extensionAttribute15")
        return value

    def to_managed_device(self) -> ManagedDevice:
        return ManagedDevice(
            device_id=self.azure_ad_device_id.lower(),
            display_name=self.device_name,
            user_principal_name=self.user_principal_name,
            operating_system=self.operating_system,
            compliance_state=self.compliance_state,
            compliance_grace_period_expiration=self.compliance_grace_period_expiration_date_time,
            threat_level=self.threat_level,
            threat_source=self.threat_source,
            eas_device_id=self.eas_device_id,
            management_agent=self.management_agent,
            jail_broken=self.jail_broken,
            last_sync=self.last_sync_date_time,
            threat_reported_at=self.threat_reported_date_time,
            device_ownership=(self.managed_device_owner_type.value.capitalize()
                              if self.managed_device_owner_type else None),
            manufacturer=self.manufacturer,
            model=self.model,
            operating_system_version=self.os_version,
            trust_type=self.trust_type,
            extension_attributes=tuple(sorted(self.extension_attributes.items())),
            intune_device_id=self.intune_device_id,
            serial_number=self.serial_number,
        )


def device_record(device: ManagedDevice) -> DeviceRecord:
    """The inverse of ``to_managed_device``: how a device is written down (decision log, replay)."""
    fields = dict(
        azure_ad_device_id=device.device_id,
        eas_device_id=device.eas_device_id,
        device_name=device.display_name,
        user_principal_name=device.user_principal_name,
        operating_system=device.operating_system,
        compliance_state=device.compliance_state,
        compliance_grace_period_expiration_date_time=device.compliance_grace_period_expiration,
        threat_level=device.threat_level,
        threat_source=device.threat_source,
        threat_reported_date_time=device.threat_reported_at,
        management_agent=device.management_agent,
        jail_broken=device.jail_broken,
        last_sync_date_time=device.last_sync,
        managed_device_owner_type=OwnerType(device.device_ownership.lower()) if device.device_ownership else None,
        manufacturer=device.manufacturer,
        model=device.model,
        os_version=device.operating_system_version,
        trust_type=device.trust_type,
        extension_attributes=dict(device.extension_attributes),
        intune_device_id=device.intune_device_id,
        serial_number=device.serial_number,
    )
    return DeviceRecord.model_validate({DeviceRecord.model_fields[name].alias: value
                                        for name, value in fields.items() if value is not None})


class InventoryFile(Model):
    """The inventory file: ``devices:`` followed by device records."""

    devices: list[DeviceRecord]


class FileDeviceInventory:
    """The embedded inventory: a YAML file read once at start, answered from memory."""

    name = "file"

    def __init__(self, devices: dict[str, ManagedDevice], records: tuple[DeviceRecord, ...] = ()) -> None:
        self._devices = devices
        self.records = records
        self._by_key: dict[tuple[DeviceKey, str], list[str]] = {}
        for device_id, device in sorted(devices.items()):
            for key in (DeviceKey.intune_device_id, DeviceKey.serial_number):
                value = key_value(device, key)
                if value is not None:
                    self._by_key.setdefault((key, value), []).append(device_id)

    @classmethod
    def load(cls, path: Path, display_name: str | None = None) -> FileDeviceInventory:
        shown = display_name or str(path)
        data, problems = read_yaml(path, shown)
        inventory = None
        if not problems:
            inventory, problems = validate(InventoryFile, data, shown)
        if inventory is not None:
            problems += _duplicates(inventory, data, shown)
        raise_if(problems)
        assert inventory is not None  # no problems
        return cls({d.azure_ad_device_id.lower(): d.to_managed_device() for d in inventory.devices},
                   tuple(inventory.devices))

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        return self._devices.get(device_id.lower())

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        value = normalised(key, value)
        if key is DeviceKey.azure_ad_device_id:
            return [value] if value in self._devices else []
        return self._by_key.get((key, value), [])[:MATCHES_MAX]

    def __len__(self) -> int:
        return len(self._devices)


class OverlayInventory:
    """One inventory laid over another: the top one answers for the devices it knows."""

    def __init__(self, top: DeviceInventory, bottom: DeviceInventory) -> None:
        self.top, self.bottom = top, bottom
        self.name = f"{top.name}+{bottom.name}"

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        return await self.top.managed_device(device_id) or await self.bottom.managed_device(device_id)

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        """The top's devices, and the bottom's that the top does not know (for those it knows, the
        top's record answers, and it names them otherwise)."""
        found = set(await self.top.device_ids_for(key, value))
        for device_id in await self.bottom.device_ids_for(key, value):
            if device_id not in found and await self.top.managed_device(device_id) is None:
                found.add(device_id)
        return sorted(found)[:MATCHES_MAX]


class KeysSeen:
    """The device keys an import has listed so far. Each names one device: a record whose
    ``azureADDeviceId`` is listed already is refused at its line, and so is one whose
    ``intuneDeviceId`` or ``serialNumber`` another device has (a certificate naming it could not
    tell the two apart)."""

    def __init__(self) -> None:
        self._device_ids: set[str] = set()
        self._owners: dict[tuple[DeviceKey, str], str] = {}

    def repeated(self, record: DeviceRecord) -> list[tuple[DeviceKey, str]]:
        """The keys of ``record`` listed before, each with the problem; the others are remembered."""
        device_id = record.azure_ad_device_id.lower()
        repeats = []
        if device_id in self._device_ids:
            repeats.append((DeviceKey.azure_ad_device_id, f"device {record.azure_ad_device_id!r} is listed twice"))
        self._device_ids.add(device_id)
        for key, value in ((DeviceKey.intune_device_id, record.intune_device_id),
                           (DeviceKey.serial_number, record.serial_number)):
            owner = self._owners.setdefault((key, value), device_id) if value is not None else device_id
            if owner != device_id:
                repeats.append((key, f"{key.value} {value!r} is already device {owner}'s"))
        return repeats


def _duplicates(inventory: InventoryFile, data: object, shown: str) -> list[ConfigProblem]:
    seen = KeysSeen()
    return [locate(data, ("devices", index, key.value), shown, problem)
            for index, record in enumerate(inventory.devices) for key, problem in seen.repeated(record)]
