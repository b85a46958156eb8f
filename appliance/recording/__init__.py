"""Call recordings at rest: per-recording keys wrapped by the site key, authenticated segments,
an index in the site database, retention, erasure and export (see docs/recording.md)."""

from appliance.recording.crypto import (
    IncompleteRecording,
    KeyUnwrapError,
    RecordingCryptoError,
    SegmentReader,
    SegmentWriter,
    SiteKeyError,
    TamperedRecording,
    load_site_key,
)
from appliance.recording.store import (
    ActiveRecording,
    ErasureReport,
    ExportReport,
    RecordingErased,
    RecordingInfo,
    RecordingStore,
    UnknownRecording,
    ensure_schema,
)

__all__ = [
    "ActiveRecording",
    "ErasureReport",
    "ExportReport",
    "IncompleteRecording",
    "KeyUnwrapError",
    "RecordingCryptoError",
    "RecordingErased",
    "RecordingInfo",
    "RecordingStore",
    "SegmentReader",
    "SegmentWriter",
    "SiteKeyError",
    "TamperedRecording",
    "UnknownRecording",
    "ensure_schema",
    "load_site_key",
]
