"""Shipped resource presets: the URL shapes of Exchange and SharePoint (see DOMAIN.md), so a
config says ``resourcePresets: {exchange: [mail.contoso.test]}`` instead of listing them."""

from __future__ import annotations

from gateway.config.models import Resource, ResourcePreset

PRESETS: dict[ResourcePreset, dict[str, tuple[str, list[str]]]] = {
    ResourcePreset.exchange: {
        "exchange-activesync": ("Exchange ActiveSync", ["/Microsoft-Server-ActiveSync"]),
        "exchange-owa": ("Outlook on the web", ["/owa/"]),
        "exchange-owa-attachments": ("Outlook on the web attachments", ["/owa/service.svc/s/GetFileAttachment"]),
        "exchange-ews": ("Exchange Web Services", ["/EWS/"]),
        "exchange-autodiscover": ("Autodiscover", ["/autodiscover/"]),
        "exchange-mapi": ("MAPI over HTTP", ["/mapi/"]),
    },
    ResourcePreset.sharepoint: {
        "sharepoint-sites": ("SharePoint sites", ["/sites/"]),
        "sharepoint-api": ("SharePoint REST API", ["/_api/", "/sites/*/_api/"]),
        "sharepoint-csom": ("SharePoint client object model", ["/_vti_bin/", "/sites/*/_vti_bin/"]),
        "sharepoint-downloads": ("SharePoint downloads",
                                 ["/_layouts/15/download.aspx", "/sites/*/_layouts/15/download.aspx"]),
    },
}


DOWNLOAD_RESOURCES = frozenset({"exchange-owa-attachments", "sharepoint-downloads"})


def expand_presets(presets: dict[ResourcePreset, list[str]]) -> dict[str, Resource]:
    """The named resources a ``resourcePresets`` mapping stands for, on the hosts given."""
    return {
        name: Resource.model_construct(hosts=list(hosts), paths=list(paths), display_name=display_name, public=False,
                                       downloads=name in DOWNLOAD_RESOURCES)
        for preset, hosts in presets.items()
        for name, (display_name, paths) in PRESETS[preset].items()
    }
