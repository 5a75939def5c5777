"""The demo's host names and the ActiveSync path the tests address."""

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
SERVICE = "portcullis.contoso.test"
ACTIVESYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceType=iPhone"
